"""Per-layer KV cache for decode: static buffers in blocks, in-place appends, byte accounting.

After a pruned prefill each layer holds its own number of prompt tokens. A layer's KV is kept as
    [ sink | kept prompt blocks of block_size | tail (window + remainder) | generated tokens ]
in one buffer [b, Hkv, capacity, d] with spare room for generated tokens, so a decode step
writes its token in place at a device-side index (no torch.cat, static shapes: a CUDA graph can
replay the step) and attends over the buffer's valid prefix, whose length is a device tensor.
The buffer grows by `grow_by` tokens when full (a rare host-side event that re-records the
decode graph).

`SlimKVCache` is a transformers `Cache`, so `model.generate` carries it between steps; the
decode itself runs in `slimcompile.runtime.decode`. `kv="offload"` layers live in
`slimcompile.runtime.offload` and share this interface.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:
    from slimcompile.runtime.config import RuntimeConfig


@dataclasses.dataclass(frozen=True)
class KVBytes:
    """Bytes of KV held on the model's device (a GPU, or the CPU for a CPU model) and in host
    memory. `gpu` is the former name of `device`, kept for callers."""

    device: int
    host: int

    @property
    def gpu(self) -> int:
        return self.device

    def __add__(self, other: "KVBytes") -> "KVBytes":
        return KVBytes(self.device + other.device, self.host + other.host)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def write_token(k_buf: torch.Tensor, v_buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: torch.Tensor) -> None:
    """Store one token's k/v ([b, Hkv, 1, d]) in place at row `row` (a [1] device tensor) of the
    buffers. The decode step calls it inside its compiled pre-attention region, where Inductor
    fuses k's store into the RoPE kernel and v's into one small kernel (one kernel per layer fewer
    than two separate `index_copy` launches; session-5 trace)."""
    k_buf.index_copy_(2, row, k)
    v_buf.index_copy_(2, row, v)


class DecodeLayerKV(CacheLayerMixin):
    """Interface of a layer's decode-time KV: static buffers the decode step writes in place (`write_token`), and what attention reads."""

    is_compileable = False
    supports_early_init = False

    def __init__(self, prompt_len: int, capacity: int, device: torch.device):
        # CacheLayerMixin.__init__ would assign `keys`/`values`, which are read-only views here.
        self.prompt_len = prompt_len  # prompt tokens this layer processed (its kept tokens)
        self.generated = 0  # host-side count of generated tokens written
        self.capacity = capacity
        self.device = device
        self.is_initialized = True

    # `k_buf`/`v_buf` [b, Hkv, capacity, d] are the static buffers the decode step reads and writes.
    @property
    def keys(self) -> torch.Tensor:
        """The rows this layer holds on the device, in buffer order (a view, no spare rows)."""
        return self.k_buf[:, :, : self.write_index()]

    @property
    def values(self) -> torch.Tensor:
        return self.v_buf[:, :, : self.write_index()]

    # -- what the decode step uses --------------------------------------------------------------
    def write_index(self) -> int:
        """Buffer row where the next generated token goes (host int; the step turns it into a tensor).

        Every layout keeps its held rows first and its spare rows last, so the decode step attends
        over the prefix [0, write_index] once the new token is written there."""
        raise NotImplementedError

    # Hooks around attention in the decode step; `OffloadedLayerKV` loads and prefetches blocks there.
    def before_attention(self, q: torch.Tensor) -> None:
        pass

    def after_attention(self, q: torch.Tensor) -> None:
        pass

    def join(self) -> None:
        pass

    def bytes(self) -> KVBytes:
        """Bytes allocated for this layer's KV (spare rows included) on the device and in host memory."""
        raise NotImplementedError

    def prompt_rows_on_device(self) -> int:
        """Prompt tokens whose KV sits on the device (the rest, if any, is in host memory)."""
        raise NotImplementedError

    def row_bytes(self) -> int:
        """Bytes of one token's k and v in this layer."""
        return 2 * self.k_buf.shape[0] * self.k_buf.shape[1] * self.k_buf.shape[3] * self.k_buf.element_size()

    def advance(self) -> None:
        self.generated += 1

    def free_rows(self) -> int:
        return self.capacity - self.write_index()

    def grow(self, extra: int) -> None:
        pad = self.k_buf.new_zeros(*self.k_buf.shape[:2], extra, self.k_buf.shape[3])
        self.k_buf = torch.cat([self.k_buf, pad], dim=2)
        self.v_buf = torch.cat([self.v_buf, pad.clone()], dim=2)
        self.capacity += extra

    # -- transformers' CacheLayerMixin ----------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "a SlimKVCache is filled by the slim decode runtime; it cannot extend through the HF forward "
            "(a model whose forward is not the one slimcompile.compile installed, e.g. after slimcompile.uncompile; "
            "pass kv='dynamic' to slimcompile.compile to decode through the compiled graph)"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.prompt_len + self.generated

    def get_max_length(self) -> int:
        return -1


class ResidentLayerKV(DecodeLayerKV):
    """All of a layer's KV on the device: rows [0, prompt_len) prompt, then generated tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, reserve: int):
        b, h, L, d = keys.shape
        super().__init__(L, L + reserve, keys.device)
        self.k_buf = keys.new_zeros(b, h, L + reserve, d)
        self.v_buf = values.new_zeros(b, h, L + reserve, d)
        self.k_buf[:, :, :L] = keys
        self.v_buf[:, :, :L] = values

    def write_index(self) -> int:
        return self.prompt_len + self.generated

    def bytes(self) -> KVBytes:
        return KVBytes(_nbytes(self.k_buf, self.v_buf), 0)

    def prompt_rows_on_device(self) -> int:
        return self.prompt_len


def drain(cache: Cache) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield each layer's (keys, values) of a transformers cache and drop the cache's references."""
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        layer.keys = layer.values = None
        yield k, v
        del k, v


class SlimKVCache(Cache):
    """The decode-time cache of a slim-compiled model: one `DecodeLayerKV` per decoder layer.

    Built from the prefill's per-layer KV (`from_prefill`). `get_seq_length()` is the prompt
    length plus the generated tokens (positions continue from the ORIGINAL prompt length in
    every layer, whatever it kept).
    """

    def __init__(self, layers: list[DecodeLayerKV], prompt_len: int, grow_by: int):
        super().__init__(layers=layers)
        self.prompt_len = prompt_len
        self.grow_by = grow_by
        self.generated = 0
        self.decoder = None  # the runtime decoder bound to these buffers (set by runtime.decode)

    @classmethod
    def from_prefill(cls, kv: Iterable[tuple[torch.Tensor, torch.Tensor]], prompt_len: int,
                     config: "RuntimeConfig") -> "SlimKVCache":
        """Wrap the prefill's per-layer ([b, Hkv, L_layer, d] keys, values) according to `config.kv`
        (a `runtime.config.RuntimeConfig`).

        Layers are converted one at a time, so an iterable that lets go of each source layer
        (see `drain`) keeps the extra memory of the conversion to one layer's KV.
        """
        reserve = config.decode_reserve
        layers: list[DecodeLayerKV] = []
        for k, v in kv:
            if config.kv == "offload":
                from slimcompile.runtime.offload import OffloadedLayerKV

                layers.append(OffloadedLayerKV(k, v, config))
            else:
                layers.append(ResidentLayerKV(k, v, reserve))
            del k, v
        return cls(layers, prompt_len, reserve)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prompt_len + self.generated

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    # The cache operations of beam search, assisted and prompt-lookup decoding. `slimcompile.compile`
    # sends such generations to transformers' cache (kv="dynamic"), so these are reached only by a
    # caller that drives the cache itself: refuse clearly rather than half-update the buffers.
    def _refuse(self, what: str):
        raise NotImplementedError(
            f"a SlimKVCache (the slim decode runtime's buffers) does not support {what}; "
            "compile with kv='dynamic' for decoding loops that reorder, crop or re-batch the cache"
        )

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self._refuse("reorder_cache (beam search)")

    def crop(self, *args, **kwargs) -> None:
        self._refuse("crop (assisted / prompt-lookup decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("batch_select_indices")

    def reset(self) -> None:
        self._refuse("reset")

    def advance(self) -> None:
        self.generated += 1
        for layer in self.layers:
            layer.advance()

    def ensure_room(self) -> bool:
        """Grow every full layer by `grow_by` rows; True if any buffer moved (graphs must re-record)."""
        moved = False
        for layer in self.layers:
            if layer.free_rows() <= 0:
                layer.grow(self.grow_by)
                moved = True
        return moved

    def bytes_per_layer(self) -> list[KVBytes]:
        return [layer.bytes() for layer in self.layers]

    def bytes(self) -> KVBytes:
        total = KVBytes(0, 0)
        for b in self.bytes_per_layer():
            total = total + b
        return total

    def prompt_bytes_on_device(self) -> int:
        """Bytes of prompt KV resident on the device, summed over layers (generated tokens and spare rows excluded)."""
        return sum(layer.prompt_rows_on_device() * layer.row_bytes() for layer in self.layers)
