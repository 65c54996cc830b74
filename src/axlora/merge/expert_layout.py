"""Where a model parameter that peft adapted (``target_parameters``) is stored in the base checkpoint.

transformers 5 fuses MoE experts into 3-D parameters when it loads a model (``mlp.experts.gate_up_proj``:
experts x 2*intermediate x hidden, ``mlp.experts.down_proj``: experts x hidden x intermediate), but for the
families whose checkpoints keep one linear layer per expert it converts them back when it saves (its
``conversion_mapping``): Qwen2/3-MoE, DeepSeek, GLM-MoE, OLMoE, ... store ``mlp.experts.<e>.gate_proj/up_proj/
down_proj.weight``; Mixtral stores ``block_sparse_moe.experts.<e>.w1/w3/w2.weight``. Others (gpt-oss, Llama 4)
store the fused tensor itself. The merge keeps the checkpoint's own layout, so it needs to know which rows of
which expert each stored tensor holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from axlora.core.errors import UserError
from axlora.core.safetensors_header import TensorInfo
from axlora.merge.base import BaseModel

# A fused parameter's per-expert tensors, in the order transformers concatenates their rows (gate before up).
_PER_EXPERT: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
# Module names transformers renames on load: Mixtral's checkpoints keep block_sparse_moe where the model says mlp.
_RENAMED_ON_LOAD = ((".mlp.", ".block_sparse_moe."),)


@dataclass(frozen=True)
class StoredPiece:
    """A checkpoint tensor holding rows ``rows`` of expert ``expert``'s (out x in) matrix of a fused parameter."""

    info: TensorInfo
    expert: int
    rows: tuple[int, int]


@dataclass(frozen=True)
class StoredParameter:
    """A model parameter as the checkpoint holds it: one tensor (``whole``) or one piece per expert and part."""

    name: str
    whole: TensorInfo | None = None
    pieces: tuple[StoredPiece, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape in the model: (experts, out, in) when stored per expert."""
        if self.whole is not None:
            return self.whole.shape
        experts = self.pieces[-1].expert + 1
        return (experts, self.pieces[-1].rows[1], self.pieces[0].info.shape[1])


def locate_parameter(base: BaseModel, name: str) -> StoredParameter | None:
    """The checkpoint tensor(s) that hold model parameter ``name``; None when the base has no such parameter."""
    host, _, leaf = name.rpartition(".")
    hosts = _stored_hosts(host)
    for stored in hosts:
        info = base.tensors.get(f"{stored}.{leaf}")
        if info is not None:
            return StoredParameter(name, whole=info)
    for stored in hosts:
        for parts in _PER_EXPERT.get(leaf, ()):
            pieces = _per_expert_pieces(base, stored, parts)
            if pieces:
                return StoredParameter(name, pieces=pieces)
    return None


def _stored_hosts(host: str) -> list[str]:
    """The module's name in the model first, then the names the checkpoint may use for it instead."""
    names = [host]
    for model_name, stored_name in _RENAMED_ON_LOAD:
        if model_name in f"{host}.":
            names.append(f"{host}.".replace(model_name, stored_name)[:-1])
    return names


def _per_expert_pieces(base: BaseModel, host: str, parts: tuple[str, ...]) -> tuple[StoredPiece, ...]:
    """``<host>.<e>.<part>.weight`` for e = 0, 1, ... while they exist; every expert must hold every part alike."""
    pieces: list[StoredPiece] = []
    expert = 0
    while f"{host}.{expert}.{parts[0]}.weight" in base.tensors:
        row = 0
        for i, part in enumerate(parts):
            info = base.tensors.get(f"{host}.{expert}.{part}.weight")
            first = pieces[i].info if expert else None  # expert 0's tensor of this part
            if info is None or len(info.shape) != 2 or (first is not None and info.shape != first.shape):
                raise UserError(
                    f"{base.directory}: the MoE experts under {host!r} are stored one per expert, but "
                    f"{host}.{expert}.{part}.weight is missing or shaped unlike expert 0's; the checkpoint is incomplete")
            pieces.append(StoredPiece(info, expert, (row, row + info.shape[0])))
            row += info.shape[0]
        expert += 1
    if pieces and len({p.info.shape[1] for p in pieces}) != 1:
        raise UserError(f"{base.directory}: the per-expert tensors under {host!r} disagree on their input width")
    return tuple(pieces)
