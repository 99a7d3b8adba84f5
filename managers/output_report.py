"""What a step reports to the detokenizer: each touched request's new tokens
(since its last report), finish reason and counts, gathered into one
`BatchTokenIDOut` per step."""

from __future__ import annotations

from managers.io_struct import BatchTokenIDOut
from managers.schedule_batch import Req


class OutputReport:
    def __init__(self) -> None:
        self.pending = BatchTokenIDOut()

    def add(self, req: Req) -> None:
        if req.hidden:  # n > 1's shared prefill: nobody asked for it
            return
        out = self.pending
        out.rids.append(req.rid)
        out.new_token_ids.append(req.output_ids[req.reported_len :])
        out.new_token_logprobs.append(req.output_token_logprobs[req.reported_len :] if req.return_logprob else None)
        out.new_top_logprobs.append(req.output_top_logprobs[req.reported_len :] if req.return_logprob else None)
        req.reported_len = len(req.output_ids)
        out.finished_reasons.append(req.finished_reason)
        out.prompt_tokens.append(len(req.origin_input_ids))
        out.completion_tokens.append(len(req.output_ids))
        out.cached_tokens.append(req.cached_tokens)
        out.spec_verify_ct.append(req.spec_verify_ct)
        out.spec_accepted_tokens.append(req.spec_accepted_tokens)
        out.skip_special_tokens.append(req.sampling_params.skip_special_tokens)
        out.stop_strings.append(list(req.sampling_params.stop or ()))

    def take(self) -> BatchTokenIDOut:
        out, self.pending = self.pending, BatchTokenIDOut()
        return out
