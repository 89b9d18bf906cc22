"""FlashPrefillConfig (the knobs of the algorithm) and BlockSparsePattern (what it selects)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense attention below this many key tokens (Hopper). Measured on an H200 (BENCHMARKS.md,
# crossover): with the Triton attention kernel the whole flash_prefill against cuDNN dense on
# structured input was 0.89x at 6K, 1.04x at 8K and 1.12x at 10K; with the Hopper (Gluon) kernel
# 1.26x at 6K and 1.58x at 10K. 10K stays: there a pattern that keeps every block costs about
# cuDNN's time (kernel 0.94-1.03x plus the pattern stage), below it more. (Since the fifteenth
# session the dense attention below it runs on the Hopper kernel itself where that takes the call:
# api.DENSE_ON_HOPPER_KERNEL.)
DEFAULT_MIN_SEQ_LEN = 10240

# alpha per model family, from the FlashPrefill paper's settings.
_FAMILY_ALPHA = {
    "qwen2-vl": 0.1,
    "qwen2.5-vl": 0.1,
    "qwen3-vl": 0.22,
    "llama-3.1": 0.18,
    "qwen2.5": 0.08,
    "qwen3": 0.12,
}


@dataclass(frozen=True)
class FlashPrefillConfig:
    """Settings of FlashPrefill block-sparse prefill (see kernels/flash_prefill/README.md).

    block_size: tokens per sparsity block (a power of two, 16..256).
    alpha: keep key block J for query block I if score(I, J) >= alpha * max_J score(I, J); 0 keeps all.
    sink_blocks: the first blocks every query block keeps.
    window_blocks: blocks ending at the diagonal every query block keeps.
    last_full_blocks: the last query blocks of the sequence attend to every block before them.
    min_seq_len: below this key length attention runs dense.
    pattern_per_kv_head: one pattern per KV head (FlashPrefill V2): the block scores of the query
        heads of a group, each normalised by its own row maximum, are summed and thresholded once,
        so every head of the group keeps the same blocks. Off by default (DESIGN.md's per-head
        pattern); BENCHMARKS.md has its measured speed and accuracy.
    mean_correction: each pruned key block that a query block sees whole enters every query row's
        softmax as one token (FlashPrefill V2): logit scale * q . kbar_J + log(block_size), value
        vbar_J, the block's mean key and value. That is exact for a block of equal keys and
        approximates the mass and output of the others. Off by default (DESIGN.md's attention
        over the kept blocks only). The attention kernels attend the tokens after each query
        tile's kept blocks. BENCHMARKS.md has its measured cost and accuracy.
    """

    block_size: int = 128
    alpha: float = 0.1
    sink_blocks: int = 2
    window_blocks: int = 4
    last_full_blocks: int = 2
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN
    pattern_per_kv_head: bool = False
    mean_correction: bool = False

    def __post_init__(self) -> None:
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 16 or bs > 256 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two in [16, 256], got {bs!r}")
        if not isinstance(self.alpha, (int, float)) or not (0.0 <= float(self.alpha) <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        for name in ("sink_blocks", "window_blocks", "last_full_blocks", "min_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.pattern_per_kv_head, bool):
            raise ValueError(f"pattern_per_kv_head must be a bool, got {self.pattern_per_kv_head!r}")
        if not isinstance(self.mean_correction, bool):
            raise ValueError(f"mean_correction must be a bool, got {self.mean_correction!r}")

    def runs_dense(self, kv_len: int) -> bool:
        """Whether `flash_prefill` attends `kv_len` keys densely (every causal block; below min_seq_len)."""
        return kv_len < self.min_seq_len

    def full_rows(self, q_len: int, kv_len: int) -> int:
        """How many of a call's queries (the last `q_len` of `kv_len` positions) lie in the sequence's
        last `last_full_blocks`, which keep every causal block: its last queries from the first
        position of those blocks on."""
        num_blocks = -(-kv_len // self.block_size)
        start = max(0, num_blocks - self.last_full_blocks) * self.block_size
        return max(0, min(q_len, kv_len - start))

    def keeps_every_block(self, q_len: int, kv_len: int) -> bool:
        """Whether every query block of a call (its `q_len` queries the last of `kv_len` positions) is
        one of the sequence's last `last_full_blocks`, which keep every causal block (DESIGN.md step
        3): the pattern is all causal blocks whatever the scores, and the call dense attention."""
        return q_len > 0 and self.full_rows(q_len, kv_len) == q_len

    @classmethod
    def for_model(cls, family: str, **overrides) -> FlashPrefillConfig:
        """The paper's settings for a model family, e.g. "qwen2.5-vl" or "qwen3-vl"."""
        key = family.lower().strip()
        if key not in _FAMILY_ALPHA:
            raise ValueError(f"unknown model family {family!r}; known: {', '.join(sorted(_FAMILY_ALPHA))}")
        return cls(**{"alpha": _FAMILY_ALPHA[key], **overrides})


@dataclass
class BlockSparsePattern:
    """Kept key blocks per (batch, query head, query block), in the style of torch's BlockMask.

    kv_num_blocks: int32 (B, HQ, NQB), how many key blocks query block I keeps.
    kv_indices: int32 (B, HQ, NQB, NKB), the kept key block ids in ascending order in the first
        kv_num_blocks entries; entries past that are unspecified.
    Query block q of the pattern is absolute block (kv_len - q_len) // block_size + q.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.kv_indices.shape)  # type: ignore[return-value]

    @property
    def first_q_block(self) -> int:
        return (self.kv_len - self.q_len) // self.block_size

    def causal_blocks(self) -> torch.Tensor:
        """int64 (NQB,): how many key blocks each query block can see (J <= I)."""
        nqb = self.kv_num_blocks.shape[-1]
        return torch.arange(nqb, device=self.kv_num_blocks.device) + self.first_q_block + 1

    def density(self) -> float:
        """Kept blocks over causally visible blocks, over the whole pattern."""
        kept = self.kv_num_blocks.to(torch.float64).sum()
        total = self.causal_blocks().to(torch.float64).sum() * self.kv_num_blocks.shape[0] * self.kv_num_blocks.shape[1]
        return float(kept / total)

    def density_per_head(self) -> torch.Tensor:
        """float64 (B, HQ): kept over visible blocks for each batch entry and query head."""
        return self.kv_num_blocks.to(torch.float64).sum(-1) / self.causal_blocks().to(torch.float64).sum()

    def to_dense(self) -> torch.Tensor:
        """bool (B, HQ, NQB, NKB): True where a key block is kept."""
        nkb = self.kv_indices.shape[-1]
        slot = torch.arange(nkb, device=self.kv_indices.device)
        valid = slot < self.kv_num_blocks.unsqueeze(-1)
        index = torch.where(valid, self.kv_indices.long(), nkb)
        dense = torch.zeros(*self.kv_indices.shape[:-1], nkb + 1, dtype=torch.bool, device=self.kv_indices.device)
        dense.scatter_(-1, index, True)
        return dense[..., :nkb]

    @classmethod
    def from_dense(cls, mask: torch.Tensor, block_size: int, q_len: int, kv_len: int) -> BlockSparsePattern:
        """Build a pattern from a bool (B, HQ, NQB, NKB) block mask."""
        nkb = mask.shape[-1]
        num = mask.sum(-1, dtype=torch.int32)
        # Stable sort puts kept blocks first, in ascending order.
        order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
        ids = torch.arange(nkb, device=mask.device).expand_as(mask).gather(-1, order)
        return cls(num, ids.to(torch.int32).contiguous(), block_size, q_len, kv_len)

    def __repr__(self) -> str:
        b, hq, nqb, nkb = self.shape
        return (
            f"BlockSparsePattern(shape=({b}, {hq}, {nqb}, {nkb}), block_size={self.block_size}, "
            f"q_len={self.q_len}, kv_len={self.kv_len})"
        )
