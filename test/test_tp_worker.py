"""The overlap worker thread: device binding and failures reach the caller."""

from __future__ import annotations

import threading

import torch

from managers.tp_worker import OverlapTpWorker, TpModelWorker, cuda_device_index
from model_executor.forward_batch import ForwardBatch, ForwardMode
from model_executor.model_config import ModelRunnerConfig


def test_cuda_device_index_resolves_explicit_indices_without_cuda():
    assert cuda_device_index(torch.device("cpu")) is None
    assert cuda_device_index(torch.device("cuda", 3)) == 3


class _UnbindableWorker(OverlapTpWorker):
    """Stands for a GPU whose `set_device` fails on the worker thread (the
    review's index-less "cuda" case), which this CPU machine cannot produce."""

    def _bind_device(self) -> None:
        raise ValueError("Expected a torch.device with a specified index or an integer")


def test_a_worker_thread_that_cannot_bind_its_device_fails_the_step_instead_of_hanging(tiny_qwen3):
    worker = TpModelWorker(ModelRunnerConfig(model_path=str(tiny_qwen3), max_total_tokens=256, max_running_requests=4))
    overlap = _UnbindableWorker(worker, max_batch_size=4)
    slots = worker.model_runner.token_to_kv_pool_allocator.alloc(2)
    batch = ForwardBatch.build(ForwardMode.EXTEND, [5, 6], [0], [0], [2], slots, "cpu")
    overlap.launch(batch)
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            overlap.result()
        except BaseException as err:  # noqa: BLE001 -- recorded for the assertion
            raised.append(err)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "result() hung on a dead worker thread"
    assert isinstance(raised[0], RuntimeError)
    assert "specified index" in str(raised[0].__cause__)
    overlap.shutdown()
    assert not overlap.thread.is_alive()


def test_overlap_worker_runs_a_step_on_cpu(tiny_qwen3):
    worker = TpModelWorker(ModelRunnerConfig(model_path=str(tiny_qwen3), max_total_tokens=256, max_running_requests=4))
    overlap = OverlapTpWorker(worker, max_batch_size=4)
    runner = worker.model_runner
    row = runner.req_to_token_pool.alloc(1)[0]
    slots = runner.token_to_kv_pool_allocator.alloc(3)
    runner.req_to_token_pool.req_to_token[row, :3] = slots.to(torch.int32)
    batch = ForwardBatch.build(ForwardMode.EXTEND, [5, 6, 7], [row], [0], [3], slots, "cpu")
    placeholder = overlap.launch(batch)
    result = overlap.result()
    assert placeholder.tolist() == [-1]
    assert result.token_ids.shape == (1,)
    overlap.shutdown()


def test_a_placeholder_stands_for_the_last_of_several_tokens(tiny_qwen3):
    """A row that verified guesses returns several tokens; the next batch's
    placeholder for it resolves, on the device, to the last of them."""
    config = ModelRunnerConfig(model_path=str(tiny_qwen3), dtype="float32", max_total_tokens=256,
                               max_running_requests=4)
    prompt = [11, 12, 13, 14, 15]

    def sequence(worker: TpModelWorker) -> tuple[int, torch.Tensor]:
        """A req_to_token row with 32 slots mapped in order."""
        runner = worker.model_runner
        row = runner.req_to_token_pool.alloc(1)[0]
        slots = runner.token_to_kv_pool_allocator.alloc(32)
        runner.req_to_token_pool.req_to_token[row, :32] = slots.to(torch.int32)
        return row, slots

    def next_token(worker: TpModelWorker, row: int, slots: torch.Tensor, seq: list[int]) -> int:
        """Greedy next token of `seq`, recomputed from scratch."""
        fb = ForwardBatch.build(ForwardMode.EXTEND, seq, [row], [0], [len(seq)], slots[: len(seq)], "cpu")
        return int(worker.forward_batch_generation(fb).token_ids[0])

    plain = TpModelWorker(config)
    row, slots = sequence(plain)
    seq = list(prompt)
    for _ in range(5):
        seq.append(next_token(plain, row, slots, seq))
    want = seq[5:]

    worker = TpModelWorker(config)
    row, slots = sequence(worker)
    assert next_token(worker, row, slots, prompt) == want[0]
    overlap = OverlapTpWorker(worker, max_batch_size=4)
    ids = [want[0], want[1], want[2]]  # the sampled token and two right guesses
    verify = ForwardBatch.build(ForwardMode.MIXED, ids, [row], [5], [3], slots[5:8], "cpu", draft_lens=[2])
    placeholder = overlap.launch(verify)
    overlap.launch(ForwardBatch.build(ForwardMode.DECODE, placeholder, [row], [8], [1], slots[8:9], "cpu"))
    first, second = overlap.result(), overlap.result()
    assert first.num_tokens == [3] and first.token_ids.tolist() == want[1:4]
    # The decode was fed the placeholder, i.e. want[3], and continued the sequence.
    assert second.token_ids.tolist() == [want[4]]
    overlap.shutdown()
