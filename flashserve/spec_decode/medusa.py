"""Medusa-1 drafting (Cai et al. 2024; the heads are in heads.py): from the target's hidden state
at the position whose row gave a request's last token, head i proposes the token i + 1 places after
that token, all k heads in one batched call of the target's LM head.

    tokens:   ... t_{N-2} t_{N-1}         (t_{N-1} was sampled from the row of position N-2)
    feature:          h_{N-2}
    drafts:   head_0(h) → t_N,  head_1(h) → t_{N+1}, ...   (a chain of the heads' top-1 or samples)

Only the chain is verified: Medusa's tree of several candidates per head (its section 2.1.2) is not
built here, since one chain fits the engine's k-drafts-per-request verification as it is. That
verification is lossless rejection sampling or, with acceptance="typical", Medusa's typical
acceptance (its section 2.3.1; rejection_sampler.py), for which the drafts are the heads' top-1.
The row comes from the runner (RunnerOutput.hidden_states, through observe()); a request whose
latest row is not that of its last token (a prefix-cache hit it has not computed since) gets no drafts.
"""
from __future__ import annotations

import torch

from flashserve.config import EngineConfig
from flashserve.core.request import Request
from flashserve.core.sched_output import HiddenRows
from flashserve.spec_decode.draw import DrawingProposer
from flashserve.spec_decode.heads import load_heads


class MedusaProposer(DrawingProposer):
    def __init__(self, config: EngineConfig, target, device: torch.device):
        spec = config.speculative
        super().__init__(spec.samples_drafts)
        self.target = target  # its compute_logits is the heads' shared, frozen LM head
        self.heads = load_heads(spec.draft_model_path, spec.heads_config, target.dtype, device)
        self.state: dict[str, tuple[int, torch.Tensor]] = {}  # request id → (position, its hidden row (d,))

    def observe(self, hidden: list[tuple[Request, HiddenRows]]) -> None:
        for req, h in hidden:
            n = h.rows.shape[0]
            if n:
                self.state[req.request_id] = (h.first_position + n - 1, h.rows[-1].clone())

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_drafts: dict[str, int]) -> dict[str, list[int]]:
        ready = [r for r in requests if self.state.get(r.request_id, (-1,))[0] == r.num_tokens - 2]
        if not ready:
            return {}
        k = max(num_drafts[r.request_id] for r in ready)  # heads run batched; each request keeps its own
        h = torch.stack([self.state[r.request_id][1] for r in ready])  # (B, d)
        x = self.heads(h, k)  # (k, B, d)
        logits = self.target.compute_logits(x.reshape(-1, x.shape[-1])).view(k, len(ready), -1)
        out = {}
        for b, r in enumerate(ready):
            out[r.request_id], q = self.drawer.draw(r, logits[: num_drafts[r.request_id], b])
            self.drawer.keep(r.request_id, [] if q is None else [q])
        return out
