"""How a proposer with a distribution per draft position picks its drafts (Medusa, EAGLE).

A greedy request takes the argmax: a deterministic draft, verified as one-hot q, which accepts
exactly while the target's argmax agrees. A sampling request draws d ~ q = softmax(logits / T) and
hands q to the rejection sampler (Leviathan et al. 2023, Algorithm 1), whose accept-or-resample
rule keeps the target's distribution exactly whatever q is; q only sets the acceptance rate. A
seeded request draws from a generator of its own, so its drafts, hence its tokens, follow its seed.
Under typical acceptance (SpeculativeConfig.samples_drafts false) every request takes the argmax,
as Medusa does: that rule judges a draft by the target's p alone, so the best draft to offer is the
heads' best guess at the target's most likely token, and no randomness is spent on drafting.
"""
from __future__ import annotations

import torch

from flashserve.core.request import Request

_DRAFT_SEED_SALT = 0x5EED  # the draft generator must not replay the runner's draws of the same seed


class DraftDrawer:
    def __init__(self, sample: bool):
        """`sample`: sampling requests draw their drafts from q (else every request takes the argmax)."""
        self.sample = sample
        self.generators: dict[str, torch.Generator] = {}
        self.probs: dict[str, torch.Tensor] = {}  # request id → q (k, vocab) of its latest sampled drafts

    def keep(self, request_id: str, qs: list[torch.Tensor]) -> None:
        """The q rows of a request's latest drafts ([] for argmax drafts, which have none)."""
        if qs:
            self.probs[request_id] = torch.cat(qs)
        else:
            self.probs.pop(request_id, None)

    def draw(self, req: Request, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """logits: (n, vocab) float32 for n draft positions → (n drafts, q (n, vocab) or None for argmax)."""
        params = req.sampling_params
        if params.is_greedy or not self.sample:
            return logits.argmax(dim=-1).tolist(), None
        q = torch.softmax(logits / params.temperature, dim=-1)  # (n, vocab)
        drafts = torch.multinomial(q, 1, generator=self._generator(req)).squeeze(1)
        return drafts.tolist(), q

    def _generator(self, req: Request) -> torch.Generator | None:
        seed = req.sampling_params.seed
        if seed is None:
            return None
        gen = self.generators.get(req.request_id)
        if gen is None:
            gen = self.generators[req.request_id] = torch.Generator().manual_seed(seed ^ _DRAFT_SEED_SALT)
        return gen

    def free(self, request_ids) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)
            self.probs.pop(rid, None)


class DrawingProposer:
    """What Medusa's and EAGLE's proposers share: drafts drawn by a DraftDrawer, and what each keeps
    per request (`state`), forgotten with its drafts' q when the request ends."""

    def __init__(self, sample_drafts: bool):
        self.drawer = DraftDrawer(sample_drafts)
        self.state: dict = {}  # request id → the proposer's own per-request record

    def draft_probs(self, request_id: str) -> torch.Tensor | None:
        return self.drawer.probs.get(request_id)

    def free(self, request_ids) -> None:
        for rid in request_ids:
            self.state.pop(rid, None)
        self.drawer.free(request_ids)
