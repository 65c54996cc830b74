"""``quantize_moe_experts``: fused MoE expert weights (3-D parameters, which bitsandbytes' layer swap leaves in full
precision) stored like the rest of a quantized base: 4-bit NF4 with a 4-bit base (QLoRA), row-wise int8 with an
8-bit one (as Axolotl does).

Each expert of a stack is quantized with bitsandbytes on its own, and the stack stays an ordinary ``nn.Parameter`` of
the experts module whose tensor is a ``PackedExperts``: it reports the original shape and dtype, and any operation on
it runs on the dequantized weights. The model code runs unchanged, and reading one expert (``experts[i]``, what the
experts' loop does) dequantizes that expert only. Because the parameter keeps its name and place, peft's
``target_parameters`` (``lora_target_parameters``) wraps it as it wraps a full-precision stack: its LoRA proxy adds
the expert delta to the dequantized weights on every forward, and the adapter it saves is the one a plain model
takes. Under FSDP the packed bytes move into a flat frozen parameter of the compute dtype beside the stack, which
FSDP shards and gathers like any weight, and the stack reads its bytes from there (``store_experts_flat``).
Imported only when the key is set: it needs torch and bitsandbytes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import bitsandbytes.functional as bnb
import torch
from torch.utils._pytree import tree_map

from axlora.core.errors import UserError

_ATEN = torch.ops.aten
_SHARE = {_ATEN.detach.default, _ATEN.alias.default, _ATEN.clone.default}
"""Operations whose result is the same frozen weights: a new handle on the same packed experts."""


class FlatBytes:
    """Packed expert bytes kept in a flat frozen parameter of a float dtype: FSDP-QLoRA's quantized storage
    (bitsandbytes' ``bnb_4bit_quant_storage``). ``fully_shard`` shards and gathers a flat float parameter like any
    weight, while a tensor subclass in its place would come back from sharding as plain dense weights. The bytes are
    read from the module on each use, so they are the ones FSDP gathered for the forward running now."""

    def __init__(self, module: torch.nn.Module, name: str, packed: torch.Tensor, device):
        self.module, self.name, self.device = module, name, torch.device(device)
        self.dtype, self.shape = packed.dtype, packed.shape
        self.nbytes = packed.numel() * packed.element_size()

    def read(self) -> torch.Tensor:
        flat = getattr(self.module, self.name)
        return flat.view(torch.uint8)[:self.nbytes].view(self.dtype).view(self.shape)


class PackedExperts(torch.Tensor):
    """A frozen expert stack ``(experts, ...)`` held quantized: ``bits`` 4 (NF4, one bitsandbytes quantization state
    per expert) or 8 (int8 with one scale per row, ``states`` being experts x rows)."""

    @staticmethod
    def __new__(cls, packed: torch.Tensor | FlatBytes, states, shape: torch.Size, dtype: torch.dtype, bits: int):
        tensor = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device,
                                                     requires_grad=False)
        tensor.source, tensor.states, tensor.bits = packed, states, bits
        return tensor

    def __init__(self, packed, states, shape, dtype, bits):  # the fields are set in __new__
        super().__init__()

    @property
    def packed(self) -> torch.Tensor:
        """The quantized bytes, as bitsandbytes wrote them (read from the flat storage when FSDP holds them)."""
        return self.source.read() if isinstance(self.source, FlatBytes) else self.source

    @classmethod
    def pack(cls, weight: torch.Tensor, bits: int) -> PackedExperts:
        """Quantize one expert at a time so each one dequantizes alone; 4-bit: NF4 with double-quantized absmax
        (QLoRA's recipe)."""
        experts = weight.detach()
        if bits == 8:
            rows = experts.reshape(-1, experts.shape[-1]).float()
            packed, scales, _ = bnb.int8_vectorwise_quant(rows)
            return cls(packed.reshape(experts.shape), scales.reshape(experts.shape[:-1]), weight.shape, weight.dtype, 8)
        packed, states = [], []
        for expert in experts:
            data, state = bnb.quantize_4bit(expert.reshape(1, -1).contiguous(), quant_type="nf4",
                                            compress_statistics=True)
            packed.append(data)
            states.append(state)
        return cls(torch.stack(packed), states, weight.shape, weight.dtype, 4)

    def expert(self, index: int) -> torch.Tensor:
        """Expert ``index`` dequantized, in the stack's dtype."""
        if self.bits == 8:
            rows = self.packed[index].reshape(-1, self.shape[-1])
            dense = bnb.int8_vectorwise_dequant(rows, self.states[index].reshape(-1))
        else:
            dense = bnb.dequantize_4bit(self.packed[index], self.states[index])
        return dense.reshape(self.shape[1:]).to(self.dtype)

    def dequantized(self) -> torch.Tensor:
        return torch.stack([self.expert(index) for index in range(self.shape[0])])

    def packed_bytes(self) -> int:
        scales = self.states.numel() * self.states.element_size() if self.bits == 8 else 0
        return self.packed.numel() * self.packed.element_size() + scales

    def _moved(self, device=None, dtype=None) -> PackedExperts:
        """The same weights read in another dtype or kept on another device (the packed bytes do not change)."""
        if device is None or torch.device(device) == self.device:
            return PackedExperts(self.source, self.states, self.shape, dtype or self.dtype, self.bits)
        if isinstance(self.source, FlatBytes):
            raise RuntimeError("the packed expert weights are sharded by FSDP, which places them; they do not move")
        return PackedExperts(self.packed.to(device), self.states_on(device), self.shape, dtype or self.dtype, self.bits)

    def states_on(self, device):
        """The quantization states, on ``device``."""
        if self.bits == 8:
            return self.states.to(device)
        states = [copy.deepcopy(state) for state in self.states]
        for state in states:
            state.to(device)  # moves its tensors in place
        return states

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"PackedExperts(shape={tuple(self.shape)}, dtype={self.dtype}, {'int8' if self.bits == 8 else 'nf4'})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SHARE:
            return args[0]._moved()
        if func is _ATEN._to_copy.default:
            return args[0]._moved(kwargs.get("device"), kwargs.get("dtype"))
        if func is _ATEN.select.int and args[1] == 0:
            return args[0].expert(int(args[2]))
        if func is _ATEN.set_.source_Tensor and _same_weights(*args):
            return args[0]  # registering a parametrization sets the original to itself
        if func._schema.is_mutable:
            raise RuntimeError(f"{func}: the 4-bit expert weights (quantize_moe_experts) are frozen and read-only")

        def dense(value):
            return value.dequantized() if isinstance(value, PackedExperts) else value

        return func(*tree_map(dense, args), **tree_map(dense, kwargs))


def _same_weights(tensor, source) -> bool:
    return isinstance(source, PackedExperts) and source.source is tensor.source and source.dtype == tensor.dtype


def quantize_moe_experts(model, bits: int, log: Callable[[str], None]) -> None:
    """Quantize every 3-D parameter of the model's ``experts`` modules in ``bits`` (4: NF4, 8: row-wise int8)."""
    before = after = 0
    for module_name, module in list(model.named_modules()):
        if not module_name.endswith("experts"):
            continue
        for name, weight in list(module.named_parameters(recurse=False)):
            if weight.dim() != 3:
                continue
            packed = PackedExperts.pack(weight, bits)
            setattr(module, name, torch.nn.Parameter(packed, requires_grad=False))
            before += weight.numel() * weight.element_size()
            after += packed.packed_bytes()
    if not before:
        raise UserError("quantize_moe_experts: this model has no fused expert weights (3-D parameters of an "
                        "'experts' module) to quantize; remove the key.")
    kind = "8-bit (row-wise int8)" if bits == 8 else "4-bit NF4"
    log(f"quantization: MoE expert weights in {kind} ({before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB)")


def read_experts_in(model, dtype: torch.dtype) -> None:
    """Read the packed experts in ``dtype`` again: preparing a k-bit model upcasts every half-precision parameter to
    float32, which for these would only double the size of each dequantized expert."""
    for module in model.modules():
        for name, weight in list(module.named_parameters(recurse=False)):
            if isinstance(weight, PackedExperts) and weight.dtype != dtype:
                setattr(module, name, torch.nn.Parameter(weight._moved(dtype=dtype), requires_grad=False))


def keep_packed_experts_local(model) -> None:
    """Data parallelism (DDP) starts by copying every parameter from rank 0 into the others; the packed experts are
    frozen and already the same on every rank (the same files, quantized the same way), and they cannot be written
    into, so DDP is told to leave them alone (``_ddp_params_and_buffers_to_ignore``, read when it wraps the model)."""
    model._ddp_params_and_buffers_to_ignore = [name for name, weight in model.named_parameters()
                                               if isinstance(weight, PackedExperts)]



def flat_bytes(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of ``packed`` as a 1-D tensor of ``dtype``, zero-padded to a whole number of its elements."""
    raw = packed.contiguous().view(torch.uint8).reshape(-1)
    size = torch.empty((), dtype=dtype).element_size()
    padded = torch.zeros(-(-raw.numel() // size) * size, dtype=torch.uint8, device=raw.device)
    padded[:raw.numel()] = raw
    return padded.view(dtype)


def store_experts_flat(model, device) -> list[torch.nn.Parameter]:
    """Move the bytes of every packed expert stack into FSDP-QLoRA's storage: a flat frozen parameter of the stack's
    compute dtype beside it (``<name>_packed``), which ``fully_shard`` shards with the layer. The stack itself stays
    the parameter peft's ``target_parameters`` wraps, reading its bytes from that storage; its quantization states
    (a few bytes per block of weights, the same on every rank) stay whole, on ``device``. Returns the stacks, which
    FSDP must leave alone: they hold no bytes of their own."""
    stacks = []
    for module in model.modules():
        for name, weight in list(module.named_parameters(recurse=False)):
            if not isinstance(weight, PackedExperts) or isinstance(weight.source, FlatBytes):
                continue
            storage = f"{name}_packed"
            module.register_parameter(storage, torch.nn.Parameter(flat_bytes(weight.packed, weight.dtype),
                                                                  requires_grad=False))
            source = FlatBytes(module, storage, weight.packed, device)
            experts = PackedExperts(source, weight.states_on(device), weight.shape, weight.dtype, weight.bits)
            setattr(module, name, torch.nn.Parameter(experts, requires_grad=False))
            stacks.append(getattr(module, name))
    return stacks
