"""llama.cpp's load-time invariants, checked on a GGUF header before llama.cpp sees the file.

Each check here mirrors a place where llama.cpp (the build llama-cpp-python 0.3.36 vendors) aborts the whole
process (GGML_ASSERT, an uncaught std::out_of_range) or refuses the file with an error that reads worse than ours.
Aborts cannot be caught from Python, so a damaged file must be refused before it is opened; what no check
foresees is caught by the child-process probe (backends/llamacpp_probe.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# GGUF value types (gguf.constants.GGUFValueType), spelled out because the checks below are tables of them.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_TYPE_NAMES = {UINT8: "UINT8", INT8: "INT8", UINT16: "UINT16", INT16: "INT16", UINT32: "UINT32", INT32: "INT32",
               FLOAT32: "FLOAT32", BOOL: "BOOL", STRING: "STRING", ARRAY: "ARRAY", UINT64: "UINT64", INT64: "INT64",
               FLOAT64: "FLOAT64"}  # fmt: skip

_DEFAULT_ALIGNMENT = 32
# llama-hparams.h: LLAMA_MAX_LAYERS and LLAMA_MAX_EXPERTS; llama_model_base::load_hparams asserts both.
_MAX_LAYERS = 512
_MAX_EXPERTS = 1024
# llama-model.cpp: LLAMA_ROPE_SCALING_TYPES; any other name fails a GGML_ASSERT.
_ROPE_SCALING_TYPES = frozenset({"none", "linear", "yarn", "longrope"})

# Keys llama.cpp reads with a typed getter (llama_model_loader::get_key), which refuses any other type. "{arch}"
# is the file's general.architecture. A tuple of element types means the key may also be a per-layer array.
_SCALAR_KEY_TYPES: dict[str, tuple[int, tuple[int, ...]]] = {
    "general.alignment": (UINT32, ()),
    "general.architecture": (STRING, ()),
    "general.name": (STRING, ()),
    "{arch}.context_length": (UINT32, ()),
    "{arch}.embedding_length": (UINT32, ()),
    "{arch}.block_count": (UINT32, ()),
    "{arch}.vocab_size": (UINT32, ()),
    "{arch}.nextn_predict_layers": (UINT32, ()),
    "{arch}.expert_count": (UINT32, ()),
    "{arch}.expert_group_count": (UINT32, ()),
    "{arch}.expert_group_used_count": (UINT32, ()),
    "{arch}.expert_used_count": (UINT32, (UINT32, INT32)),
    "{arch}.feed_forward_length": (UINT32, (UINT32, INT32)),
    "{arch}.attention.head_count": (UINT32, (UINT32, INT32)),
    "{arch}.attention.head_count_kv": (UINT32, (UINT32, INT32)),
    "{arch}.attention.key_length": (UINT32, ()),
    "{arch}.attention.value_length": (UINT32, ()),
    "{arch}.attention.layer_norm_rms_epsilon": (FLOAT32, ()),
    "{arch}.attention.layer_norm_epsilon": (FLOAT32, ()),
    "{arch}.rope.dimension_count": (UINT32, ()),
    "{arch}.rope.freq_base": (FLOAT32, ()),
    "{arch}.rope.scaling.type": (STRING, ()),
    "{arch}.rope.scaling.factor": (FLOAT32, ()),
    "tokenizer.ggml.model": (STRING, ()),
    "tokenizer.ggml.pre": (STRING, ()),
    "tokenizer.ggml.add_bos_token": (BOOL, ()),
    "tokenizer.ggml.add_eos_token": (BOOL, ()),
    "tokenizer.ggml.add_space_prefix": (BOOL, ()),
    "tokenizer.chat_template": (STRING, ()),
}
# Arrays llama-vocab.cpp reads by index: (allowed element types, whether their length must equal the vocabulary's).
_VOCAB_ARRAYS: dict[str, tuple[tuple[int, ...], bool]] = {
    "tokenizer.ggml.tokens": ((STRING,), True),
    "tokenizer.ggml.scores": ((FLOAT32, INT32), True),
    "tokenizer.ggml.token_type": ((INT32,), True),
    "tokenizer.ggml.merges": ((STRING,), False),
}
# The special-token ids llama_vocab::impl::load reads as UINT32 (its `special_token_types` list, deprecated names
# included); it never reads others (cls_token_id, for one), so they may have any type.
_SPECIAL_TOKEN_KEYS = tuple(
    f"tokenizer.ggml.{name}_token_id"
    for name in ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask",  # "seperator" [sic], as llama.cpp spells it
                 "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix", "middle")
)  # fmt: skip
_EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps")


class HeaderDamage(Exception):
    """What is wrong with a header, as the end of the sentence '<file> is corrupted: …'."""

    def __init__(self, what: str, truncated: bool = False) -> None:
        super().__init__(what)
        self.truncated = truncated


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # from the start of the data section
    n_bytes: int
    n_elements: int


@dataclass
class GGUFHeader:
    """A GGUF header as gguf_info read it: metadata values (large arrays left undecoded), their types, the tensors."""

    file_size: int
    metadata: dict[str, object] = field(default_factory=dict)
    value_types: dict[str, int] = field(default_factory=dict)
    arrays: dict[str, tuple[int, int]] = field(default_factory=dict)  # key: (element type, length)
    tensors: list[TensorInfo] = field(default_factory=list)
    header_end: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def tokens(self) -> list[bytes] | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return tokens if isinstance(tokens, list) else None

    @property
    def alignment(self) -> int:
        return int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))  # type: ignore[call-overload]

    def arch_value(self, key: str, default: int = 0) -> int:
        """`{arch}.key` as one number: the largest of a per-layer array."""
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        if isinstance(value, list):
            return max((int(item) for item in value), default=default)
        return int(value)  # type: ignore[call-overload]


def check_header(header: GGUFHeader) -> None:
    """Raise HeaderDamage for the first thing in `header` known to make llama.cpp abort or refuse the file."""
    _check_key_types(header)
    _check_tensor_layout(header)
    _check_vocabulary(header)
    _check_hyperparameters(header)
    _check_experts(header)


def _type_name(value_type: int) -> str:
    return _TYPE_NAMES.get(value_type, f"type {value_type}")


def _check_key_types(header: GGUFHeader) -> None:
    arch = header.architecture
    for pattern, (expected, array_items) in _SCALAR_KEY_TYPES.items():
        key = pattern.replace("{arch}", arch)
        actual = header.value_types.get(key)
        if actual is None or actual == expected:
            continue
        if actual == ARRAY and header.arrays[key][0] in array_items:
            continue
        shown = f"an ARRAY of {_type_name(header.arrays[key][0])}" if actual == ARRAY else f"a {_type_name(actual)}"
        raise HeaderDamage(f"metadata {key} is {shown} where llama.cpp reads a {_type_name(expected)}")
    alignment = header.alignment
    if alignment <= 0 or alignment & (alignment - 1):
        raise HeaderDamage(f"general.alignment {alignment} is not a power of two")
    for key in _SPECIAL_TOKEN_KEYS:
        if key in header.value_types and header.value_types[key] != UINT32:
            raise HeaderDamage(f"metadata {key} is a {_type_name(header.value_types[key])} where llama.cpp reads a UINT32")


def _check_tensor_layout(header: GGUFHeader) -> None:
    # gguf.cpp lays tensors out back to back, each padded to the alignment, and refuses any other offset; the data
    # section starts at the first aligned byte after the header.
    alignment = header.alignment
    data_start = header.header_end + (-header.header_end % alignment)
    expected = 0
    for tensor in header.tensors:
        end = data_start + tensor.offset + tensor.n_bytes
        if end > header.file_size:
            raise HeaderDamage(f"tensor {tensor.name} ends at byte {end:,} but the file has {header.file_size:,}", truncated=True)
        if tensor.offset % alignment:
            raise HeaderDamage(f"tensor {tensor.name}'s data offset {tensor.offset:,} is not a multiple of the alignment {alignment}")
        if tensor.offset != expected:
            raise HeaderDamage(f"tensor {tensor.name}'s data starts at offset {tensor.offset:,} where it should start at {expected:,}")
        expected += tensor.n_bytes + (-tensor.n_bytes % alignment)


def _check_vocabulary(header: GGUFHeader) -> None:
    for key, (item_types, same_length) in _VOCAB_ARRAYS.items():
        if key not in header.value_types:
            continue
        if header.value_types[key] != ARRAY or header.arrays[key][0] not in item_types:
            wanted = " or ".join(_type_name(item) for item in item_types)
            raise HeaderDamage(f"metadata {key} is not an array of {wanted}")
    tokens = header.tokens
    if tokens is None:
        return
    n_tokens = len(tokens)
    for key, (_, same_length) in _VOCAB_ARRAYS.items():
        # llama.cpp reads one entry per token: a shorter array is read past its end, a longer one is harmless (and
        # files in the wild have them), so only a shorter one is refused.
        if same_length and key in header.arrays and header.arrays[key][1] < n_tokens:
            raise HeaderDamage(f"{key} holds {header.arrays[key][1]:,} entries for a vocabulary of {n_tokens:,} tokens")
    _check_unique_tokens(tokens)
    # A special token id outside the vocabulary only makes llama.cpp warn and ignore it; the summary does the same.


def _check_unique_tokens(tokens: list[bytes]) -> None:
    # llama-vocab.cpp maps each token's text to its id and asserts that no two ids share a text (a single bit flip
    # in one token can make it equal another). Empty tokens are renamed "[EMPTY_<id>]" first, so do the same.
    if b"" in tokens:
        tokens = [token or f"[EMPTY_{index}]".encode() for index, token in enumerate(tokens)]
    if len(set(tokens)) == len(tokens):
        return
    first_id: dict[bytes, int] = {}
    for index, token in enumerate(tokens):
        if token in first_id:
            text = token.decode("utf-8", errors="replace")
            raise HeaderDamage(f"vocabulary tokens {first_id[token]} and {index} are both {text!r}")
        first_id[token] = index


def _check_hyperparameters(header: GGUFHeader) -> None:
    arch = header.architecture
    if f"{arch}.block_count" in header.metadata:
        block_count = header.arch_value("block_count")
        if not 0 < block_count <= _MAX_LAYERS:
            raise HeaderDamage(f"{arch}.block_count is {block_count:,} (llama.cpp allows 1 to {_MAX_LAYERS})")
        if header.arch_value("nextn_predict_layers") > block_count:
            raise HeaderDamage(f"{arch}.nextn_predict_layers is larger than its block count")
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        # ggml's norm kernels assert eps >= 0 on the first decode (a NaN fails it too).
        epsilon = header.metadata.get(f"{arch}.{key}")
        if isinstance(epsilon, float) and not epsilon >= 0:
            raise HeaderDamage(f"{arch}.{key} is {epsilon:g}, where llama.cpp needs a small positive number")
    scaling = header.metadata.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling not in _ROPE_SCALING_TYPES:
        raise HeaderDamage(f"{arch}.rope.scaling.type is {scaling!r}, which llama.cpp does not know")


def _check_experts(header: GGUFHeader) -> None:
    # llama_model_base::load_hparams asserts these relations between the expert counts.
    arch = header.architecture
    count, used = header.arch_value("expert_count"), header.arch_value("expert_used_count")
    groups, groups_used = header.arch_value("expert_group_count"), header.arch_value("expert_group_used_count")
    if count > _MAX_EXPERTS:
        raise HeaderDamage(f"{arch}.expert_count is {count:,} (llama.cpp allows at most {_MAX_EXPERTS})")
    if used > count:
        raise HeaderDamage(f"{arch}.expert_used_count is {used:,} but {arch}.expert_count is {count:,}" if count else
                           f"{arch}.expert_used_count is {used:,} without any experts ({arch}.expert_count is 0 or missing)")  # fmt: skip
    if count and not used:
        raise HeaderDamage(f"{arch}.expert_count is {count:,} but no expert is used ({arch}.expert_used_count is 0 or missing)")
    if groups and (groups >= count or count % groups or (groups > 1 and not 0 < groups_used < groups)):
        raise HeaderDamage(f"{arch}.expert_group_count {groups} does not divide its {count} experts into groups")
    for tensor in header.tensors:
        kind = tensor.name.split(".")[-2] if tensor.name.endswith(".weight") and tensor.name.count(".") >= 2 else ""
        if kind in _EXPERT_TENSORS:
            experts = tensor.shape[2] if len(tensor.shape) > 2 else 1
            if experts != count:
                raise HeaderDamage(f"tensor {tensor.name} holds {experts} experts but {arch}.expert_count is {count}")
        elif kind == "ffn_gate_inp" and count and (len(tensor.shape) < 2 or tensor.shape[1] != count):
            raise HeaderDamage(f"tensor {tensor.name} routes to {tensor.shape[-1]} experts but {arch}.expert_count is {count}")
