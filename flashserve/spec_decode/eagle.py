"""EAGLE-1 drafting (Li et al. 2024; the layer is heads.EagleLayer): one decoder layer of its own
over the target's features, with a KV cache of its own, drafting k tokens autoregressively.

Per request the layer keeps one entry per position j whose feature f_j the target computed (the
rows the runner hands over through observe()) and whose next token t_{j+1} is known: its keys and
values, and the layer's output at the last entry, the predicted feature of the request's last token.

    tokens:    t_0 ... t_{N-2} t_{N-1}              features f_0 ... f_{N-2} (t_{N-1} not computed yet)
    entries:   (f_0, t_1) ... (f_{N-2}, t_{N-1})  → f^_{N-1} → head → d_0
    drafting:  (f^_{N-1}, d_0) → f^_N → d_1, ...   (k - 1 more layer steps on its own predictions)

The draft entries are never kept: after verification the target's true features of the accepted
tokens arrive and extend the cache from where it was. Positions the target did not compute (a
prefix-cache hit) have no features: the layer's context then starts at the first position it saw,
which can only lower acceptance, never change what the target emits.

Features are entered lazily: observe() only keeps the rows, and the layer runs over all rows kept
since its last entry, in one call, when the request is next asked for drafts. A request that
adaptive k has stopped drafting (draft_length.py) then costs no layer call per step, and when it
probes again the layer catches up over its whole context at the cost of about one call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flashserve.config import EngineConfig
from flashserve.core.request import Request
from flashserve.core.sched_output import HiddenRows
from flashserve.spec_decode.draw import DrawingProposer
from flashserve.spec_decode.heads import load_heads


MAX_PENDING_ROWS = 1024  # rows kept for a request not drafting; past this its context restarts


@dataclass
class _LayerState:
    start: int  # the position of the first entry
    past: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values (1, kv_heads, n, hd)
    num_entries: int = 0
    next_feature: torch.Tensor | None = None  # (1, 1, d): the predicted feature after the last entry
    pending: list[torch.Tensor] = field(default_factory=list)  # rows (n_i, d) from position `end` on
    num_pending: int = 0

    @property
    def end(self) -> int:
        return self.start + self.num_entries


class EagleProposer(DrawingProposer):
    def __init__(self, config: EngineConfig, target, device: torch.device):
        spec = config.speculative
        super().__init__(spec.samples_drafts)
        self.target = target  # its embedding and LM head, shared and frozen
        self.layer = load_heads(spec.draft_model_path, spec.heads_config, target.dtype, device)
        self.device = device
        self.state: dict[str, _LayerState] = {}

    def _embed(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        return self.target.model.embed(ids)[None]  # (1, n, d)

    def _step(self, features: torch.Tensor, token_ids: list[int], first: int, past):
        """Layer over n consecutive entries from position `first`: (outputs (1, n, d), new keys/values)."""
        positions = torch.arange(first, first + len(token_ids), device=self.device)
        return self.layer(features, self._embed(token_ids), positions, past)

    def observe(self, hidden: list[tuple[Request, HiddenRows]]) -> None:
        for req, h in hidden:
            n = h.rows.shape[0]
            if not n:
                continue
            state = self.state.get(req.request_id)
            if (state is None or state.end + state.num_pending != h.first_position  # new, or not its continuation
                    or state.num_pending + n > MAX_PENDING_ROWS):
                state = self.state[req.request_id] = _LayerState(h.first_position)
            state.pending.append(h.rows.clone())  # the runner's buffer is reused by the next step
            state.num_pending += n

    def _catch_up(self, req: Request, state: _LayerState) -> None:
        """Enter the kept rows whose next token is known, in one layer call."""
        if not state.pending:
            return
        rows, first = torch.cat(state.pending), state.end  # (n, d)
        state.pending, state.num_pending = [], 0
        nxt = req.all_token_ids[first + 1 : first + rows.shape[0] + 1]  # t_{j+1} of each row
        if not nxt:
            return  # a row without its next token breaks the chain: the next observe() restarts it
        out, state.past = self._step(rows[None, : len(nxt)], nxt, first, state.past)
        state.num_entries += len(nxt)
        state.next_feature = out[:, -1:]

    @torch.inference_mode()
    def propose(self, requests: list[Request], num_drafts: dict[str, int]) -> dict[str, list[int]]:
        for r in requests:
            if (s := self.state.get(r.request_id)) is not None:
                self._catch_up(r, s)
        ready = [r for r in requests
                 if (s := self.state.get(r.request_id)) is not None and s.end == r.num_tokens - 1]
        if not ready:
            return {}
        feats = [self.state[r.request_id].next_feature for r in ready]  # (1, 1, d) each
        pasts = [self.state[r.request_id].past for r in ready]
        wants = [num_drafts[r.request_id] for r in ready]
        drafts: list[list[int]] = [[] for _ in ready]
        qs: list[list[torch.Tensor]] = [[] for _ in ready]
        for i in range(max(wants)):
            drafting = [b for b in range(len(ready)) if i < wants[b]]
            logits = self.target.compute_logits(torch.cat([feats[b] for b in drafting]).view(len(drafting), -1))
            for row, b in enumerate(drafting):  # logits: (len(drafting), vocab)
                r = ready[b]
                (tok,), q = self.drawer.draw(r, logits[row : row + 1])
                drafts[b].append(tok)
                if q is not None:
                    qs[b].append(q)
                if i + 1 < wants[b]:  # the last draft is never fed back
                    feats[b], pasts[b] = self._step(feats[b], [tok], r.num_tokens - 1 + i, pasts[b])
        for b, r in enumerate(ready):
            self.drawer.keep(r.request_id, qs[b])
        return {r.request_id: drafts[b] for b, r in enumerate(ready)}
