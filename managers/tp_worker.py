"""Runs batches on the model: directly, or on a worker thread for overlap.

`TpModelWorker` is the synchronous form: forward, sample, return the ids.

`OverlapTpWorker` runs the same on its own thread (on a GPU it would be its
own stream; on CPU a thread plays that part). `launch` returns at once with
placeholder ids for the batch's next tokens: negative numbers that index a
device-side future map. The scheduler may feed them to the next batch as
input ids before they are known; the worker swaps them for the real ids on
the device right before that batch runs. `result()` hands back the oldest
launched batch's ids, in order.
"""

from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
import torch

from model_executor.distributed import TPGroup
from model_executor.forward_batch import ForwardBatch
from model_executor.model_config import ModelRunnerConfig
from model_executor.model_runner import ModelRunner
from sampling.verify import accept_drafts
from managers.step_result import StepResult


class TpModelWorker:
    def __init__(self, config: ModelRunnerConfig, tp_group: TPGroup | None = None) -> None:
        self.model_runner = ModelRunner(config, tp_group)
        self.tp_group = tp_group if tp_group is not None and tp_group.size > 1 else None

    def forward_batch_generation(self, batch: ForwardBatch, top_logprobs_num: int = -1) -> StepResult:
        """`top_logprobs_num` -1: no logprobs; 0: the sampled token's only; k: also the top k."""
        logits = self.model_runner.forward(batch)
        ids = self.model_runner.sample(logits, batch)
        drafted = batch.draft_lens_cpu is not None
        choices = self.model_runner.sample_guess_positions(logits.verify_logits, batch) if drafted else None
        if self.tp_group is not None:
            # Every rank sampled from the same gathered logits, but random
            # draws need not agree: rank 0's ids are the ones all ranks keep.
            picked = ids if choices is None else torch.cat([ids, choices])
            picked = self.tp_group.broadcast_tensor(picked.contiguous())
            ids, choices = (picked, None) if choices is None else (picked[: len(ids)], picked[len(ids) :])
        self.model_runner.record_sampled(batch, ids)
        result, token_logits = StepResult(ids), logits.next_token_logits
        if drafted:
            tokens, counts, sources = accept_drafts(choices, batch.input_ids,
                                                    batch.extend_seq_lens_cpu, batch.draft_lens_cpu, ids)
            result = StepResult(tokens, counts)
            if top_logprobs_num >= 0:
                index = torch.tensor(sources, dtype=torch.int64, device=token_logits.device)
                token_logits = torch.cat([token_logits, logits.verify_logits])[index]
        result.hidden_states = logits.hidden_states
        if top_logprobs_num < 0:
            return result
        ids = result.token_ids
        logprobs = torch.log_softmax(token_logits.float(), dim=-1)
        result.token_logprobs = logprobs.gather(1, ids.view(-1, 1)).squeeze(1)
        if top_logprobs_num > 0:
            result.top_logprobs, result.top_ids = logprobs.topk(top_logprobs_num, dim=-1)
        return result


class SyncExecutor:
    """Plain loop: the batch runs inside `launch`."""

    def __init__(self, worker: TpModelWorker) -> None:
        self.worker = worker
        self._results: list[torch.Tensor] = []

    def launch(self, batch: ForwardBatch, top_logprobs_num: int = -1) -> torch.Tensor | None:
        self._results.append(self.worker.forward_batch_generation(batch, top_logprobs_num).cpu())
        return None

    def result(self) -> StepResult:
        return self._results.pop(0)

    def shutdown(self) -> None:
        pass


def cuda_device_index(device: torch.device) -> int | None:
    """The CUDA ordinal `device` means (None off CUDA). An index-less "cuda"
    is the current device: `torch.cuda.set_device` refuses a device without
    an index, so resolve it once, on the thread that built the model."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class OverlapTpWorker:
    def __init__(self, worker: TpModelWorker, max_batch_size: int) -> None:
        self.worker = worker
        device = worker.model_runner.device
        self.device_index = cuda_device_index(device)
        # On CUDA the forward gets its own stream, so the scheduler thread's
        # copies and the next batch's preparation never queue behind it.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Slots are reused round-robin; a placeholder is read by the very next
        # batch, so room for a few batches in flight is plenty.
        self.map_size = 4 * max_batch_size + 1
        self.future_token_ids = torch.zeros(self.map_size, dtype=torch.int64, device=device)
        self.next_slot = 1  # slot 0 unused: placeholder -0 would be ambiguous
        self.max_batch_size = max_batch_size
        self.inputs: queue.Queue = queue.Queue()
        self.outputs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="overlap-forward", daemon=True)
        self.thread.start()

    def launch(self, batch: ForwardBatch, top_logprobs_num: int = -1) -> torch.Tensor:
        size = batch.batch_size
        if self.next_slot + size > self.map_size:
            self.next_slot = 1
        slots = torch.arange(self.next_slot, self.next_slot + size, dtype=torch.int64)
        self.next_slot += size
        inputs_ready = None
        if self.stream is not None:
            # The batch's host-to-device copies were queued on this thread's
            # stream; the forward stream starts after them.
            inputs_ready = torch.cuda.Event()
            inputs_ready.record()
        self.inputs.put((batch, slots, top_logprobs_num, inputs_ready))
        return -slots

    def result(self) -> StepResult:
        out = self.outputs.get()
        if isinstance(out, BaseException):
            raise RuntimeError("forward failed on the overlap worker thread") from out
        result, done, _inputs = out
        if done is not None:
            done.synchronize()  # the one host sync per iteration
        return result  # the batch's input tensors may be freed from here on

    def shutdown(self) -> None:
        self.inputs.put(None)
        self.thread.join(timeout=10)

    def _bind_device(self) -> None:
        if self.device_index is not None:
            torch.cuda.set_device(self.device_index)

    def _loop(self) -> None:
        # A failure here must reach the scheduler thread as well: a silently
        # dead worker would leave result() waiting forever.
        setup_error: BaseException | None = None
        try:
            self._bind_device()
        except BaseException as err:
            setup_error = err
        while True:
            item = self.inputs.get()
            if item is None:
                return
            if setup_error is not None:
                self.outputs.put(setup_error)
                continue
            batch, slots, top_logprobs_num, inputs_ready = item
            try:
                with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
                    if inputs_ready is not None:
                        self.stream.wait_event(inputs_ready)
                    self.outputs.put(self._run(batch, slots, top_logprobs_num))
            except BaseException as err:  # surface it on the scheduler thread
                self.outputs.put(err)

    def _run(self, batch: ForwardBatch, slots: torch.Tensor, top_logprobs_num: int):
        """Returns (host result, done event or None, inputs to keep alive).

        The batch's tensors were allocated on the scheduler thread's stream;
        the caching allocator would reuse their memory once Python drops them,
        possibly before this stream has read them. They ride along with the
        result until `done` has been waited on."""
        ids = batch.input_ids
        placeholder = ids < 0
        batch.input_ids = torch.where(placeholder, self.future_token_ids[(-ids).clamp_(min=0)], ids)
        result = self.worker.forward_batch_generation(batch, top_logprobs_num)
        device_ids = result.last_token_ids()  # what the next batch's placeholder stands for
        self.future_token_ids[slots.to(device_ids.device, non_blocking=True)] = device_ids
        if self.stream is None:
            return result.cpu(), None, None
        host = result.cpu(non_blocking=True)
        done = torch.cuda.Event()
        done.record(self.stream)
        return host, done, (batch, ids)
