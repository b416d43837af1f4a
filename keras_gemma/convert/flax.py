"""Official Gemma Flax checkpoints: the orbax directories google-deepmind/gemma releases.

Kaggle's `google/gemma/flax/2b` (and 7b, Gemma 2, Gemma 3) holds an orbax checkpoint
directory of the transformer's parameters with the SentencePiece `tokenizer.model`
beside it. The parameters are a flat tree, `{path: {leaf: array}}` (the FLAT layout of
google-deepmind/gemma's `gm/ckpts/_checkpoint.py`; transformers'
`convert_gemma3_weights_orbax_to_hf.py` reads the same names):

    transformer/embedder/input_embedding        (rows, hidden): 256128 in Gemma 1, 2; 262144 in 3
    transformer/layer_{i}/pre_attention_norm/scale, pre_ffw_norm/scale      (hidden,)
        post_attention_norm/scale, post_ffw_norm/scale                     Gemma 2 and 3
    transformer/layer_{i}/attn/q_einsum/w       (heads, hidden, head_dim)
        attn/kv_einsum/w                         (2, kv_heads, hidden, head_dim): key, value
        or, when heads == kv_heads, attn/qkv_einsum/w  (3, heads, hidden, head_dim)
    transformer/layer_{i}/attn/attn_vec_einsum/w (heads, head_dim, hidden)
    transformer/layer_{i}/attn/_query_norm/scale, _key_norm/scale (head_dim,)  Gemma 3
    transformer/layer_{i}/mlp/gating_einsum/w   (2, ffw, hidden): gate (GELU), then up;
        (2, hidden, ffw) in Gemma 1 and Gemma 2 2B (gemma's `transpose_gating_einsum=False`)
    transformer/layer_{i}/mlp/linear/w          (ffw, hidden)
    transformer/final_norm/scale                (hidden,)

The nested tree of Flax's `model.init` (`layer_0/mlp/gating_einsum`, no `transformer/`
and no `w` under `mlp`), which `gm.ckpts.save_params` writes, is read too. The image
encoder of multimodal Gemma 3 (`SigLiPFromPatches_0/...`, `embedder/mm_*`) is left out:
keras_gemma is the text model. The RMSNorm scales, RoPE halves and GELU are those of
transformers' Gemma, so a tensor needs at most a slice and a transpose.

The checkpoints carry no configuration. The tensors show the network's shape (layers,
heads, key/value heads, head width, hidden and feed-forward widths, rows of the
embedding) and which norms it has: none after the sub-layers is Gemma 1, which is then
fully known (RoPE base 10000, epsilon 1e-6). Post-norms are Gemma 2, query/key norms
Gemma 3; their other options (sliding window and layer pattern, soft caps, query scale,
RoPE bases) come from the official variant of the same shape in `keras_gemma.presets`
(the numbers of google-deepmind/gemma's `TransformerConfig`s). A tree of no official
variant loads only with those options given, `GemmaBackbone.from_preset(directory,
layer_types=..., ...)`; without them it is an error naming them.

Orbax (`pip install orbax-checkpoint`, or the `flax` extra) is imported when a
checkpoint's tensors are first needed; the tokenizer alone needs none. Orbax runs on
JAX: under another Keras backend, JAX is told not to preallocate GPU memory
(`XLA_PYTHON_CLIENT_PREALLOCATE=false`, unless already set).
"""

import contextlib
import copy
import logging
import os
import re

import keras
import numpy as np

from keras_gemma import presets
from keras_gemma.convert.weights import assign_weights

# Files orbax writes into a checkpoint directory (not `checkpoint`: TensorFlow's
# checkpoint directories have one too).
ORBAX_FILES = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
TOKENIZER = "tokenizer.model"
EMBEDDING = "transformer/embedder/input_embedding"
# Parameters of the image encoder of multimodal Gemma 3 (names in the flat layout).
_NON_TEXT_PREFIXES = ("SigLiPFromPatches_", "transformer/vision_encoder/", "transformer/embedder/mm_")
# Leaves of the nested layout that the flat one keeps under a `w`.
_BARE_NESTED_LEAVES = ("/mlp/gating_einsum", "/mlp/linear")
_LAYER = re.compile(r"transformer/layer_(\d+)/")
_FULL = "full_attention"

# What the tensors show; an official variant matches on all of it.
_SHAPE_KEYS = (
    "num_layers", "hidden_dim", "num_query_heads", "num_key_value_heads", "head_dim",
    "intermediate_dim", "use_post_attention_norm", "use_post_ffw_norm", "use_query_key_norm",
)
# What they cannot show: the Gemma 2 and 3 options a tree of no official variant
# needs from the caller.
OPTIONS = (
    "layer_types", "sliding_window_size", "query_pre_attn_scalar", "attention_logit_soft_cap",
    "final_logit_soft_cap", "rope_max_wavelength", "local_rope_max_wavelength", "rope_scaling_factor",
)


def is_checkpoint(directory):
    """Whether `directory` holds an orbax checkpoint (by orbax's own files)."""
    return any(os.path.isfile(os.path.join(directory, name)) for name in ORBAX_FILES)


def find_checkpoint(directory):
    """The orbax checkpoint `directory` is, or in Kaggle's layout holds (its
    only orbax subdirectory, beside `tokenizer.model`); None if neither."""
    if is_checkpoint(directory):
        return directory
    if not os.path.isfile(os.path.join(directory, TOKENIZER)):
        return None
    inner = [
        os.path.join(directory, name)
        for name in sorted(os.listdir(directory))
        if os.path.isdir(os.path.join(directory, name)) and is_checkpoint(os.path.join(directory, name))
    ]
    return inner[0] if len(inner) == 1 else None


def read_structure(shapes, source):
    """The network's shape and norms, from `shapes` (flat-layout name -> shape).

    Returns a dict of `GemmaBackbone` arguments the tensors determine (those of
    `_SHAPE_KEYS` and `vocabulary_size`), plus `fused_qkv` (one `qkv_einsum`)
    and `gating_transposed` (`gating_einsum` is `(2, ffw, hidden)`).
    """

    def shape(name, rank):
        if name not in shapes:
            raise ValueError(
                f"{source} has no tensor {name!r}: not a Gemma Flax checkpoint, or "
                f"one of another layout (it holds {sorted(shapes)[:6]}, ...)."
            )
        found = tuple(shapes[name])
        if len(found) != rank:
            raise ValueError(f"{source}: tensor {name!r} has shape {found}; a Gemma checkpoint's has {rank} axes.")
        return found

    rows, hidden = shape(EMBEDDING, 2)
    layers = sorted({int(m.group(1)) for m in map(_LAYER.match, shapes) if m})
    missing = sorted(set(range(layers[-1] + 1)) - set(layers)) if layers else [0]
    if missing:
        raise ValueError(f"{source} has no tensors of transformer/layer_{missing[0]}.")
    first = "transformer/layer_0/"
    fused_qkv = first + "attn/qkv_einsum/w" in shapes
    if fused_qkv:
        _, heads, _, head_dim = shape(first + "attn/qkv_einsum/w", 4)  # (3, heads, hidden, head_dim)
        kv_heads = heads
    else:
        heads, _, head_dim = shape(first + "attn/q_einsum/w", 3)  # (heads, hidden, head_dim)
        kv_heads = shape(first + "attn/kv_einsum/w", 4)[1]  # (2, kv_heads, hidden, head_dim)
    ffw = shape(first + "mlp/linear/w", 2)[0]  # (ffw, hidden)
    gating = shape(first + "mlp/gating_einsum/w", 3)
    if ffw == hidden:
        raise ValueError(
            f"{source}: the feed-forward width equals the hidden width ({ffw}), so the "
            f"shape {gating} of {first}mlp/gating_einsum/w cannot tell (2, ffw, hidden) "
            "from (2, hidden, ffw); no official Gemma has this shape."
        )
    return {
        "vocabulary_size": rows,
        "num_layers": len(layers),
        "num_query_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_dim": hidden,
        "intermediate_dim": 2 * ffw,  # keras_gemma counts the gate and up branches
        "head_dim": head_dim,
        "use_post_attention_norm": first + "post_attention_norm/scale" in shapes,
        "use_post_ffw_norm": first + "post_ffw_norm/scale" in shapes,
        "use_query_key_norm": first + "attn/_query_norm/scale" in shapes,
        "fused_qkv": fused_qkv,
        "gating_transposed": gating[1:] == (ffw, hidden),
    }


def official_variant(structure):
    """The name in `keras_gemma.presets.PRESETS` of the official variant with
    this shape and these norms, or None."""
    for name, config in presets.PRESETS.items():
        if all(config.get(key, False) == structure[key] for key in _SHAPE_KEYS):
            return name
    return None


def unset_options(num_layers):
    """The `OPTIONS` of a tree of no official variant until the caller gives
    them: every layer global, no window, caps or scaling, RoPE base 10000."""
    return {
        "layer_types": [_FULL] * num_layers,
        "sliding_window_size": None,
        "query_pre_attn_scalar": None,
        "attention_logit_soft_cap": None,
        "final_logit_soft_cap": None,
        "rope_max_wavelength": 10_000.0,
        "local_rope_max_wavelength": None,
        "rope_scaling_factor": 1.0,
    }


def backbone_config_from_shapes(shapes, source):
    """`GemmaBackbone` arguments for the tensors `shapes` (flat-layout name ->
    shape; `source` names the checkpoint in errors). See the module docstring:
    Gemma 1 from the shapes alone, Gemma 2 and 3 from the official variant of
    that shape, else the shapes with `unset_options`. `vocabulary_size` is the
    embedding's rows, all of them."""
    return _backbone_config(read_structure(shapes, source))


def _is_gemma1(structure):
    """No norm after the sub-layers, none on queries and keys."""
    return not any(structure[key] for key in ("use_post_attention_norm", "use_post_ffw_norm", "use_query_key_norm"))


def _backbone_config(structure):
    config = {key: structure[key] for key in _SHAPE_KEYS + ("vocabulary_size",)}
    config["layer_norm_epsilon"] = 1e-6
    if _is_gemma1(structure):
        # Nothing more to know.
        for key in ("use_post_attention_norm", "use_post_ffw_norm", "use_query_key_norm"):
            del config[key]
        return {**config, "rope_max_wavelength": 10_000.0}
    variant = official_variant(structure)
    if variant is not None:
        return {**presets.backbone_config(variant), "vocabulary_size": structure["vocabulary_size"]}
    return {**config, **unset_options(config["num_layers"])}


def weight_map(backbone, rows, fused_qkv, gating_transposed):
    """`[(flat-layout tensor name, its shape, variable, transform)]` for every
    variable of `backbone`, as `assign_weights` takes them: `rows` of the
    checkpoint's embedding (the first `vocabulary_size` are kept), and the
    checkpoint's attention and feed-forward layouts (see `read_structure`)."""
    n, k, h = backbone.num_query_heads, backbone.num_key_value_heads, backbone.head_dim
    d, f = backbone.hidden_dim, backbone.intermediate_dim // 2
    v = backbone.vocabulary_size

    def same(w):
        return w

    def head(index):
        # (heads, hidden, head_dim) slice `index` of a stacked einsum -> kernel (hidden, heads, head_dim)
        return lambda w: w[index].transpose(1, 0, 2)

    if gating_transposed:
        gating_shape, gate, up = (2, f, d), (lambda w: w[0].T), (lambda w: w[1].T)  # (ffw, hidden) -> (hidden, ffw)
    else:
        gating_shape, gate, up = (2, d, f), (lambda w: w[0]), (lambda w: w[1])
    entries = [
        (EMBEDDING, (rows, d), backbone.token_embedding.embeddings, lambda w: w[:v]),
        ("transformer/final_norm/scale", (d,), backbone.layer_norm.scale, same),
    ]
    for i, block in enumerate(backbone.transformer_layers):
        p = f"transformer/layer_{i}/"
        attention, ffw = block.attention, block.feed_forward
        entries.append((p + "pre_attention_norm/scale", (d,), block.pre_attention_norm.scale, same))
        if fused_qkv:
            qkv = p + "attn/qkv_einsum/w"  # (3, heads, hidden, head_dim)
            entries += [
                (qkv, (3, n, d, h), attention.query_dense.kernel, head(0)),
                (qkv, (3, n, d, h), attention.key_dense.kernel, head(1)),
                (qkv, (3, n, d, h), attention.value_dense.kernel, head(2)),
            ]
        else:
            kv = p + "attn/kv_einsum/w"  # (2, kv_heads, hidden, head_dim)
            entries += [
                (p + "attn/q_einsum/w", (n, d, h), attention.query_dense.kernel, lambda w: w.transpose(1, 0, 2)),
                (kv, (2, k, d, h), attention.key_dense.kernel, head(0)),
                (kv, (2, k, d, h), attention.value_dense.kernel, head(1)),
            ]
        # (heads, head_dim, hidden), as the output kernel.
        entries.append((p + "attn/attn_vec_einsum/w", (n, h, d), attention.output_dense.kernel, same))
        if attention.query_norm is not None:
            entries.append((p + "attn/_query_norm/scale", (h,), attention.query_norm.scale, same))
            entries.append((p + "attn/_key_norm/scale", (h,), attention.key_norm.scale, same))
        if block.post_attention_norm is not None:
            entries.append((p + "post_attention_norm/scale", (d,), block.post_attention_norm.scale, same))
        entries.append((p + "pre_ffw_norm/scale", (d,), block.pre_ffw_norm.scale, same))
        entries += [
            (p + "mlp/gating_einsum/w", gating_shape, ffw.gate.kernel, gate),
            (p + "mlp/gating_einsum/w", gating_shape, ffw.up.kernel, up),
            # (ffw, hidden) -> down kernel (hidden, ffw)
            (p + "mlp/linear/w", (f, d), ffw.down.kernel, np.transpose),
        ]
        if block.post_ffw_norm is not None:
            entries.append((p + "post_ffw_norm/scale", (d,), block.post_ffw_norm.scale, same))
    return entries


class FlaxLoader:
    """An official Gemma Flax (orbax) checkpoint directory, for `from_preset`.

    Gemma 1, 2 and 3 (text) parameter trees, flat (as released) or nested (as
    `gm.ckpts.save_params` writes them); see the module docstring for the
    tensors and how the architecture is inferred from them. The tokenizer is
    the `tokenizer.model` inside `directory` or beside it, in its parent (as
    on Kaggle). Tensors are read from orbax one at a time, as numpy arrays,
    whatever sharding they were saved with.

    The embedding keeps all its rows by default: 256128 in the Gemma 1 and 2
    releases, for 256000 tokenizer pieces (the last 128 are padding, never
    produced by the tokenizer). `vocabulary_size=N` keeps the first N rows
    (`GemmaBackbone.from_preset(directory, vocabulary_size=256000)`, then
    `GemmaCausalLM.from_preset(directory, backbone=backbone)`); more rows than
    the checkpoint has is an error.

    A Gemma 2 or 3 tree of no official variant needs the options its tensors
    cannot show (`OPTIONS`); loading its weights without any of them given is
    an error naming them. Every tensor is checked (present, shape, none left
    over) before any is assigned (`weights.assign_weights`).

    Args:
        directory: the orbax checkpoint directory (holding `_METADATA`,
            `_CHECKPOINT_METADATA` or `manifest.ocdbt`).

    Example:
    ```python
    # kagglehub.model_download("google/gemma/flax/2b-it") -> ".../2b-it/{2b-it/, tokenizer.model}"
    gemma_lm = keras_gemma.GemmaCausalLM.from_preset("path/to/2b-it/2b-it")
    gemma_lm.generate("The capital of France is", max_length=16)
    ```
    """

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self._opened = None

    # === Tokenizer: no orbax needed ===

    def tokenizer_path(self):
        """`tokenizer.model` inside the checkpoint directory, else beside it."""
        parent = os.path.dirname(os.path.abspath(self.directory))
        candidates = [os.path.join(self.directory, TOKENIZER), os.path.join(parent, TOKENIZER)]
        for path in candidates:
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(
            f"No {TOKENIZER} for the Flax checkpoint {self.directory}: looked for "
            f"{' and '.join(candidates)} (Kaggle's Gemma Flax downloads have it beside "
            "the checkpoint directory)."
        )

    @property
    def has_tokenizer(self):
        try:
            self.tokenizer_path()
        except FileNotFoundError:
            return False
        return True

    def load_tokenizer(self, cls, **kwargs):
        return cls(proto=self.tokenizer_path(), **kwargs)

    # === Architecture and weights ===

    def backbone_config(self):
        return copy.deepcopy(self._open()["config"])

    def check_weights(self):
        """Reads the checkpoint's metadata (shapes, no weights)."""
        self._open()

    def load_weights(self, backbone):
        opened = self._open()
        tensors, structure = opened["tensors"], opened["structure"]
        if opened["needs_options"]:
            self._check_options_given(backbone, opened["config"])
        rows = structure["vocabulary_size"]
        if backbone.vocabulary_size > rows:
            raise ValueError(
                f"{self.directory}: vocabulary_size={backbone.vocabulary_size} is more than the "
                f"{rows} rows of tensor {opened['stored'](EMBEDDING)!r}; pass vocabulary_size={rows} "
                "or fewer (the first rows are kept)."
            )
        entries = [
            (opened["stored"](name), shape, variable, transform)
            for name, shape, variable, transform in weight_map(
                backbone, rows, structure["fused_qkv"], structure["gating_transposed"]
            )
        ]
        assign_weights(tensors, entries)

    def _check_options_given(self, backbone, config):
        """A `ValueError` unless the caller gave at least one of `OPTIONS` (a
        value other than `unset_options`) for a tree of no official variant."""
        given = backbone.get_config()
        if any(given[name] != config[name] for name in OPTIONS):
            return
        family = "Gemma 3" if config["use_query_key_norm"] else "Gemma 2"
        example = "gemma3_1b" if family == "Gemma 3" else "gemma2_2b_en"
        official = presets.backbone_config(example)
        hint = ", ".join(
            f"{name}={official[name]!r}" for name in OPTIONS if name in official and name != "layer_types"
        )
        shape = ", ".join(f"{name}={config[name]}" for name in _SHAPE_KEYS[:6])
        raise ValueError(
            f"{self.directory}: a {family} parameter tree (post-norms"
            f"{', query/key norms' if family == 'Gemma 3' else ''}) of no official variant "
            f"({shape}). Its tensors cannot show {', '.join(OPTIONS)}: pass them, e.g. "
            f"keras_gemma.GemmaBackbone.from_preset({self.directory!r}, layer_types=[...], "
            f"sliding_window_size=..., ...). The official {example} has {hint} and "
            f"layer_types={official['layer_types'][:6]}...."
        )

    def _open(self):
        """Reads the checkpoint's metadata once: its tensors, structure and
        backbone config."""
        if self._opened is not None:
            return self._opened
        ocp = _import_orbax(self.directory)
        tree = _metadata_tree(ocp, self.directory)
        keys = list(tree)
        if any(key.startswith("transformer/stacked_layers") for key in keys):
            raise ValueError(
                f"{self.directory} holds Gemma parameters stacked by attention type "
                "(`transformer/stacked_layers/...`), a layout keras_gemma does not read; "
                "the released flat layout (`transformer/layer_0/...`) and Flax's nested "
                "one (`layer_0/...`) are read."
            )
        nested = not all(key.startswith(("transformer/", "SigLiPFromPatches_")) for key in keys)
        if nested and "embedder" not in tree:
            raise ValueError(
                f"{self.directory} is an orbax checkpoint, but not of Gemma parameters: "
                f"its top-level keys are {sorted(keys)[:8]} (expected `transformer/...` "
                "keys, or Flax's nested `embedder`, `layer_0`, ...)."
            )
        stored = _nested_name if nested else _same
        leaves, shapes = {}, {}
        for keypath, metadata in _leaves(tree, self.directory):
            name = "/".join(keypath)
            flat = _flat_name(name) if nested else name
            if flat.startswith(_NON_TEXT_PREFIXES):
                continue  # the image encoder; keras_gemma is the text model
            leaves[name] = (keypath, metadata)
            shapes[flat] = tuple(metadata.shape)
        structure = read_structure(shapes, self.directory)
        source = _OrbaxTensors(ocp, self.directory, leaves)
        self._opened = {
            "tensors": {name: source for name in leaves},
            "structure": structure,
            "config": _backbone_config(structure),
            "stored": stored,
            "needs_options": not _is_gemma1(structure) and official_variant(structure) is None,
        }
        return self._opened


class _OrbaxTensors:
    """The leaves of an orbax checkpoint as `assign_weights` reads a source:
    `path`, `shapes[name]`, `get(name)`. Each `get` restores one leaf as numpy
    (orbax's partial restore); the last one is kept, for the key and value
    (or gate and up) slices of one tensor."""

    def __init__(self, ocp, path, leaves):
        self._ocp, self.path, self._leaves = ocp, path, leaves
        self._checkpointer = ocp.PyTreeCheckpointer()
        self.shapes = {name: tuple(metadata.shape) for name, (_, metadata) in leaves.items()}
        self._last = (None, None)

    def get(self, name):
        if self._last[0] == name:
            return self._last[1]
        ocp = self._ocp
        keypath, metadata = self._leaves[name]
        args = ocp.args.PyTreeRestore(
            item=_nest(keypath, metadata),
            restore_args=_nest(keypath, ocp.RestoreArgs(restore_type=np.ndarray)),
            partial_restore=True,
        )
        with _quiet_absl():
            restored = self._checkpointer.restore(self.path, args=args)
        for key in keypath:
            restored = restored[key]
        self._last = (name, restored)
        return restored


def _import_orbax(directory):
    if keras.backend.backend() != "jax":
        # orbax starts JAX's backends even to read metadata; on a GPU, JAX would
        # then preallocate 75% of its memory, away from the TensorFlow or PyTorch
        # model (JAX's "GPU memory allocation" notes). A setting of the user's wins.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            f"{directory} is an orbax checkpoint (official Gemma Flax weights); reading it "
            "needs orbax-checkpoint: `pip install orbax-checkpoint` (or the extra: "
            "`pip install keras-gemma[flax]`)."
        ) from e
    return ocp


def _metadata_tree(ocp, directory):
    """The checkpoint's tree of array metadata (shapes and dtypes, no data)."""
    with _quiet_absl():
        metadata = ocp.PyTreeCheckpointer().metadata(directory)
    tree = None if metadata.item_metadata is None else metadata.item_metadata.tree
    if not isinstance(tree, dict) or not tree:
        raise ValueError(
            f"{directory} holds no orbax tree metadata (`_METADATA`); pass the "
            "directory of the parameters themselves (for a CheckpointManager step, "
            "its item subdirectory such as `default/`)."
        )
    return tree


def _leaves(tree, source, keypath=()):
    """`(keypath, array metadata)` for every leaf of a metadata tree."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, source, keypath + (key,))
        elif hasattr(value, "shape"):
            yield keypath + (key,), value
        else:
            raise ValueError(f"{source}: {'/'.join(keypath + (key,))!r} is a {type(value).__name__}, not an array.")


def _nest(keypath, value):
    for key in reversed(keypath):
        value = {key: value}
    return value


def _same(name):
    return name


def _flat_name(nested):
    """The flat layout's name of a nested-layout leaf."""
    name = "transformer/" + nested
    return name + "/w" if name.endswith(_BARE_NESTED_LEAVES) else name


def _nested_name(flat):
    """The nested layout's name of a flat-layout leaf (inverse of `_flat_name`)."""
    name = flat[len("transformer/"):] if flat.startswith("transformer/") else flat
    if name.endswith("/w") and ("/" + name[: -len("/w")]).endswith(_BARE_NESTED_LEAVES):
        name = name[: -len("/w")]
    return name


@contextlib.contextmanager
def _quiet_absl():
    """orbax warns through absl's logger about files older checkpoints lack
    (`_CHECKPOINT_METADATA`, in the 2024 releases); only its errors are shown."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
