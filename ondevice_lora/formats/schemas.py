"""Typed schemas for every JSON file odlora reads, and the one reader that applies them.

    config = read_json(adapter_dir / "adapter_config.json", PeftAdapterConfig)   # a model, or OdloraError
    manifest = to_dict(read_json(export_dir / "manifest.json", ExportManifest))  # the file's own dict

Every file kind is a pydantic model of the fields odlora uses. Types are strict (`"8"` is not
the integer 8, `1` is not `true`), numbers finite (Python's `json` accepts NaN and Infinity),
counts and ranks in range, checksums 64 hex digits, paths relative and inside their directory.
Fields that odlora does not use are allowed and kept: PEFT writes many, and a newer odlora may
add some. Whatever is wrong, `read_json` raises one `OdloraError` line naming the file and the
field, e.g. `adapters/x/adapter_config.json: r: must be an integer, got "eight"`.

This module is the files' contract: it imports nothing of ours but errors.py and user_files.py
(how a file a user named is read).
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, ClassVar, Literal, Optional, TypeVar, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, RootModel, ValidationError, WrapValidator,
                      model_validator)
from pydantic_core import PydanticCustomError

from ..errors import OdloraError
from .adapter_ids import RULE as ADAPTER_ID_RULE, is_adapter_id
from ..user_files import read_regular_file

MAX_JSON_BYTES = 64 * 2**20  # far above any file odlora writes; a larger one is not ours
MAX_RANK = 65536
MAX_COUNT = 2**31 - 1  # layers, features, tokens, steps: anything that sizes a tensor or a loop
MAX_FILE_BYTES = 2**53  # sizes stay exact as JSON numbers

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class Schema(BaseModel):
    """A JSON object with strict types and finite numbers; fields it does not name are kept."""

    model_config = _STRICT


Model = TypeVar("Model", bound=BaseModel)


# -- field types --------------------------------------------------------------------------------------

def _hex64(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("must be 64 lowercase hex digits (a sha256)")
    return value


def _fingerprint(value: str) -> str:
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        raise ValueError("must be 'sha256:' and 64 lowercase hex digits (a base fingerprint)")
    return value


def _adapter_id(value: str) -> str:
    if not is_adapter_id(value):
        raise ValueError(f"adapter id {value!r}: {ADAPTER_ID_RULE}")
    return value


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"is not a valid regular expression ({e})") from None
    return value


def inside(where: str) -> AfterValidator:
    """A relative POSIX path that stays inside `where` (no absolute path, `..` or backslash)."""
    def check(name: str) -> str:
        parts = PurePosixPath(name).parts
        if not parts:
            raise ValueError("path is empty")
        if name.startswith("/") or ".." in parts or "\\" in name or "\x00" in name:
            raise ValueError(f"path {name!r} leaves the {where}")
        return name
    return AfterValidator(check)


def either(what: str) -> WrapValidator:
    """A union reported as one phrase instead of one error per member type."""
    def check(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("union_type", f"must be {what}") from None
    return WrapValidator(check)


Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Index = Annotated[int, Field(ge=0, le=MAX_COUNT)]  # a position, a token id, a step: 0 or more
Rank = Annotated[int, Field(ge=1, le=MAX_RANK)]
Size = Annotated[int, Field(ge=0, le=MAX_FILE_BYTES)]
Positive = Annotated[float, Field(gt=0)]
Sha256 = Annotated[str, AfterValidator(_hex64)]
Fingerprint = Annotated[str, AfterValidator(_fingerprint)]
Regex = Annotated[str, AfterValidator(_regex)]
ExportPath = Annotated[str, inside("export")]
BundlePath = Annotated[str, inside("bundle")]
Free = dict[str, Any]  # an object whose content odlora does not interpret (metrics, statistics)
PromptFormat = Literal["chat", "raw"]  # how an adapter is asked (prompts.PROMPT_FORMATS)


class Versioned(Schema):
    """A file of ours with `format` and `format_version`, checked before anything else: a file
    of another kind or of a newer version says so instead of listing fields it lacks."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    KIND: ClassVar[str]  # how messages name the file kind

    format: str
    format_version: int

    @model_validator(mode="before")
    @classmethod
    def _header(cls, data):
        if isinstance(data, dict):
            if data.get("format") != cls.FORMAT:
                raise PydanticCustomError("format", f"not an odlora {cls.KIND} (format {_shown(data.get('format'))})")
            version = data.get("format_version")
            if type(version) is not int or version != cls.VERSION:
                raise PydanticCustomError("format_version", f"unknown {cls.KIND} format version {_shown(version)} "
                                                            f"(this odlora reads version {cls.VERSION})")
        return data


# -- adapters ------------------------------------------------------------------------------------------

class PeftAdapterConfig(Schema):
    """PEFT's `adapter_config.json` (a LoraConfig): the fields odlora reads or refuses."""

    peft_type: str = "LORA"
    base_model_name_or_path: Optional[str] = None
    r: Optional[Rank] = None  # None: the tensors' rank
    lora_alpha: Positive = 8.0
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Annotated[Union[list[str], str, None], either("a list of module names or a regex string")] = None
    rank_pattern: dict[Regex, Rank] = {}  # module-name regex -> its rank (PEFT's override of r)
    alpha_pattern: dict[Regex, Positive] = {}  # module-name regex -> its alpha
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Annotated[Union[list[Index], Index, None], either("a layer index or a list of them")] = None
    layers_pattern: Annotated[Union[list[str], str, None], either("a string or a list of strings")] = None


class AdapterMeta(Schema):
    """Our `odlora.json` beside an adapter: what it was trained on, with what, and how well."""

    format: Literal["odlora-adapter"] = "odlora-adapter"
    version: int = 1
    tool_version: Optional[str] = None
    base: Optional[str] = None
    base_fingerprint: Optional[Fingerprint] = None
    rank: Optional[Rank] = None
    alpha: Optional[Positive] = None
    use_rslora: Optional[bool] = None
    targets: Optional[list[str]] = None
    modules: Optional[Count] = None
    parameters: Optional[Count] = None
    interrupted: Optional[bool] = None
    prompt_format: Optional[PromptFormat] = None
    metrics: Free = {}
    data: Free = {}
    training: Free = {}


class PackedSidecar(Versioned):
    """`<blob>.json` beside a packed adapter (`odlora adapter pack`)."""

    FORMAT, VERSION, KIND = "odlora-packed-adapter", 1, "packed-adapter sidecar"

    target: str
    base_fingerprint: Fingerprint
    sha256: Sha256
    size: Size
    fingerprint_verified: Optional[bool] = None
    adapter: Optional[str] = None
    rank: Optional[Rank] = None
    modules: Optional[Count] = None
    prompt_format: Optional[PromptFormat] = None
    metrics: Free = {}


# -- exports ---------------------------------------------------------------------------------------------

class FileEntry(Schema):
    sha256: Sha256
    size: Size


class SlotLayout(Schema):
    """An export's adapter slots (`formats/slots.py` SlotSpec.to_dict); `SlotSpec.from_dict`
    checks that targets, features and layout agree."""

    targets: Annotated[list[str], Field(min_length=1)]
    max_rank: Rank
    n_layers: Count
    features: dict[str, Annotated[list[Count], Field(min_length=2, max_length=2)]]  # [in, out]
    dtype: str = "float32"
    layout: Optional[dict[str, list[Count]]] = None


class OnnxInput(Schema):
    name: str
    shape: list[Annotated[Union[Index, str], either("a dimension (a number or a name)")]]


class CacheLayout(Schema):
    past: list[str]  # the KV cache inputs, one per layer and key/value
    present: list[str]
    shape: Annotated[list[Count], Field(min_length=4, max_length=4)]  # (1, kv heads, positions, head dim)
    in_place: bool = False  # present may share past's buffer (GroupQueryAttention updates it there)


class SlotFeedGroup(Schema):
    """How one group's slot inputs map onto its fused output (`exporters/projections.py`)."""

    width: Count  # the group's fused output columns (q|k|v, gate|up, ...)
    columns: dict[str, Index]  # each slotted member's first column, in AT/BT order


class OnnxFields(Schema):
    model: ExportPath
    inputs: list[OnnxInput]
    slot_inputs: list[str]
    cache_layout: CacheLayout
    slot_feed: Optional[dict[str, SlotFeedGroup]] = None  # absent: fixed-rank lora_A_<group>.<layer> inputs


class ExecutorchMethods(Schema):
    forward: Count  # tokens per call of each method
    prefill: Count


class ExecutorchFields(Schema):
    program: ExportPath
    data: Optional[ExportPath] = None  # absent: the weights are inside the program (a delegate's own blob)
    methods: ExecutorchMethods
    backend: str = "xnnpack"  # the delegate it was lowered to (exporters/executorch_delegates.py)
    slot_feed: Optional[dict[str, SlotFeedGroup]] = None  # absent: per-layer lora_A_<group>.<layer> inputs


class CoremlArray(Schema):
    shape: list[Index]
    dtype: str


class CoremlFields(Schema):
    package: ExportPath
    inputs: dict[str, CoremlArray]


class ProgramLora(BaseModel):
    """The LoRA settings baked into a training program: exactly LoraConfig's arguments."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    rank: Rank
    alpha: Positive
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    targets: Annotated[list[str], Field(min_length=1)]
    layers: Optional[list[Index]] = None
    use_rslora: bool = False


class TrainProgramFields(Schema):
    """An ExecuTorch training program (`exporters/executorch_train.py`)."""

    program: ExportPath
    data: ExportPath
    method: str
    batch_size: Count
    seq_len: Count
    base_quant: str = "none"
    lora: ProgramLora
    parameters: dict[str, list[Count]]  # parameter name -> shape


class ExportManifest(Versioned):
    """An export's `manifest.json` (`exporters/export.py`): what it was made from, its slots,
    each target's own section (named as the target) and every file's checksum."""

    FORMAT, VERSION, KIND = "odlora-export", 1, "export"

    target: str
    quant: str
    base: str
    base_fingerprint: Fingerprint
    config: Optional[Free] = None
    max_seq_len: Count
    slots: Optional[SlotLayout] = None
    files: dict[ExportPath, FileEntry]
    onnx: Optional[OnnxFields] = None
    executorch: Optional[ExecutorchFields] = None
    coreml: Optional[CoremlFields] = None
    executorch_train: Optional[TrainProgramFields] = None

    @model_validator(mode="after")
    def _sections(self):
        section = self.target.replace("-", "_")
        if section in type(self).model_fields and getattr(self, section) is None:
            raise PydanticCustomError("section_missing", f"an export for {self.target} needs its {section!r} section")
        if self.target != "executorch-train" and self.slots is None:
            raise PydanticCustomError("section_missing", f"an export for {self.target} needs its 'slots'")
        return self


# -- bundles ---------------------------------------------------------------------------------------------

class PromptTemplate(Schema):
    chat_prefix: str
    chat_suffix: str
    stop_ids: list[Index]


class BundleAdapter(Schema):
    id: Annotated[str, AfterValidator(_adapter_id)]
    file: BundlePath
    rank: Optional[Rank] = None
    metrics: Free = {}
    prompt_format: Optional[PromptFormat] = None


class BundleManifest(Versioned):
    """A bundle's `bundle.json` (`runtime/bundle.py`)."""

    FORMAT, VERSION, KIND = "odlora-bundle", 1, "bundle"

    kind: Literal["base", "adapters"]
    target: str
    delegate: Optional[str] = None  # an ExecuTorch base's delegate (its export's "backend"): what the app loads
    base_fingerprint: Fingerprint
    slots: SlotLayout
    max_seq_len: Optional[Count] = None
    prompt: Optional[PromptTemplate] = None
    adapters: list[BundleAdapter]
    files: Annotated[dict[BundlePath, FileEntry], Field(min_length=1)]


# -- training, bases and caches ----------------------------------------------------------------------------

class ValRecord(Schema):
    step: Index
    loss: float


class TrainHistory(Schema):
    val: Annotated[list[ValRecord], Field(min_length=1)]


class CheckpointState(Schema):
    """A training checkpoint's `state.json` (`train.py` save_checkpoint); more fields may come."""

    step: Index
    history: TrainHistory
    identity: Free
    sha256: Sha256  # of state.safetensors: a torn checkpoint is refused


class DemoStage(Schema):
    key: Free
    result: Free


class DemoState(RootModel[dict[str, DemoStage]]):
    """`demo-state.json`: stage name -> what it was made from and what it made."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class FingerprintCacheEntry(Schema):
    files: list
    fingerprint: Fingerprint


class HFConfig(Schema):
    """A Hugging Face `config.json`, the fields our model reads (absent ones are the model's
    to complain about, after the architecture: see `models/llama.py` from_hf_config)."""

    model_type: Optional[str] = None
    hidden_act: Optional[str] = None
    vocab_size: Optional[Count] = None
    hidden_size: Optional[Count] = None
    intermediate_size: Optional[Count] = None
    num_hidden_layers: Optional[Count] = None
    num_attention_heads: Optional[Count] = None
    num_key_value_heads: Optional[Count] = None
    head_dim: Optional[Count] = None
    max_position_embeddings: Optional[Count] = None
    rms_norm_eps: Optional[Positive] = None
    rope_theta: Optional[Positive] = None
    rope_scaling: Optional[Free] = None
    rope_parameters: Optional[Free] = None
    tie_word_embeddings: Optional[bool] = None
    attention_bias: Optional[bool] = None
    mlp_bias: Optional[bool] = None


class SafetensorsIndex(Schema):
    """`model.safetensors.index.json`: tensor name -> the shard that holds it."""

    weight_map: Annotated[dict[str, Annotated[str, inside("model directory")]], Field(min_length=1)]


# -- the reader ------------------------------------------------------------------------------------------

def read_json(path: Path, schema: type[Model]) -> Model:
    """The file at `path` validated by `schema`. Raises FileNotFoundError when it does not exist
    (each caller says what that means), OdloraError naming file and field for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
    raw = read_regular_file(path, MAX_JSON_BYTES)  # no FIFO hang, no file larger than ours can be
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OdloraError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    try:
        return schema.model_validate_json(text)
    except ValidationError as e:
        raise OdloraError(f"{path}: {describe(e)}") from None


def to_dict(model: BaseModel) -> dict:
    """The validated file as the plain dict `json.loads` would give (defaults not filled in)."""
    return model.model_dump(by_alias=True, exclude_unset=True)


# pydantic error type -> our phrase (`{...}` from the error's context); others keep pydantic's
# message with "Input should be" read as "must be".
_PHRASES = {
    "missing": "is missing",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "finite_number": "must be a finite number",
    "extra_forbidden": "is not a known field",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "literal_error": "must be {expected}",
}


def describe(error: ValidationError) -> str:
    """The first problem of a validation error as `field: what is wrong, got VALUE`."""
    problems = error.errors(include_url=False)
    first = problems[0]
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        return f"invalid JSON ({first['msg'].removeprefix('Invalid JSON: ')})"
    if kind in ("model_type", "dict_type") and not loc:
        return f"must be a JSON object, got {_shown(first['input'])}"
    phrase = _PHRASES.get(kind)
    if phrase is not None:
        phrase = phrase.format(**first.get("ctx", {}))
    else:
        phrase = first["msg"].replace("Input should be", "must be").removeprefix("Value error, ")
    # A field's value is shown unless there is none (missing), the phrase says it all (a length)
    # or names it already (a path), or the field is a dict key; a whole-file problem (format,
    # version, a missing section) is its own message.
    named = kind == "value_error" and repr(first["input"]) in phrase
    shown = loc and loc[-1] != "[key]" and kind not in ("missing", "too_short", "too_long") and not named
    text = f"{phrase}, got {_shown(first['input'])}" if shown else phrase
    where = field_path(loc)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where}: {text}{more}" if where else f"{text}{more}"


def field_path(loc: tuple) -> str:
    """("files", "a/b.json", "sha256") -> files["a/b.json"].sha256; a dict key's own error
    (pydantic's trailing "[key]") -> `files key "../x"`."""
    if loc and loc[-1] == "[key]":
        return f"{field_path(loc[:-2])} key {json.dumps(loc[-2])}"
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _shown(value) -> str:
    """A value as the JSON file spells it, shortened; containers by their kind."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
