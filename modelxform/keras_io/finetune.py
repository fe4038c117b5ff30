"""LoRA adapters, quantization and dtype policies of a built model's layers: the Keras side of the
statements ``lora``, ``merge lora``, ``quantize`` and ``cast`` (modelxform/statements/finetune.py), and
the LoRA factors a .keras file written by modelxform keeps in its member ``modelxform.lora.h5``.

Where Keras saves what (Keras 3.15, checked by tests/test_finetune.py):

- A layer's dtype policy is saved in its own config when the layer is a node of a plain functional or
  Sequential model. A layer built inside another layer (a MultiHeadAttention's ``query``) has no config
  of its own: its policy is saved only when the layer around it (the node) carries a
  ``DTypePolicyMap`` keyed by the sublayer's ``path``, which that layer passes on to the sublayers it
  builds. A keras_hub Backbone's config holds its constructor arguments; it saves its quantized
  sublayers' policies in a ``DTypePolicyMap`` of its own, and any policy map it was built with. A
  keras_hub Task saves neither for its head (``logits``).
- ``model.save`` writes a LoRA layer's *merged* kernel and not its factors; loading zeroes both factors
  (so a model trained from the loaded file gets no gradient for them); Dense and Embedding lose
  ``lora_alpha`` (their build passes only the rank); sublayers and Backbone layers lose LoRA
  altogether. modelxform therefore writes every LoRA layer's rank, alpha and factors (and its unmerged
  kernel when the factors are not a no-op) into the member ``modelxform.lora.h5``, which Keras's loader
  ignores, and :func:`restore_lora` puts them back (``modelxform.load_model`` calls it).
"""
from __future__ import annotations

import io
import json

import numpy as np

from ..errors import ApplyError
from .layers import is_model, model_kind, walk
from .variables import numpy_dtype

LORA_MEMBER = "modelxform.lora.h5"
LORA_FORMAT = "modelxform-lora/1"


# ---- what a layer is ----------------------------------------------------------------------------

def effective_policy(layer):
    """The layer's own dtype policy: the entry for its path when it holds a DTypePolicyMap."""
    import keras
    policy = getattr(layer, "dtype_policy", None)
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        path = getattr(layer, "path", None)
        return policy[path] if path else policy.default_policy
    return policy


def policy_name(layer) -> str:
    policy = effective_policy(layer)
    return getattr(policy, "name", "?") if policy is not None else "?"


def quantization_mode(layer) -> str | None:
    return getattr(layer, "quantization_mode", None)


def lora_state(layer) -> tuple | None:
    """(rank, alpha) of a LoRA-enabled layer, else None."""
    if getattr(layer, "lora_enabled", False):
        return int(layer.lora_rank), layer.lora_alpha
    return None


def _factor_names(layer) -> tuple[str, str, str]:
    """(A, B, base) attribute names: Embedding calls them lora_embeddings_a/b and _embeddings."""
    import keras
    if isinstance(layer, keras.layers.Embedding):
        return "lora_embeddings_a", "lora_embeddings_b", "_embeddings"
    return "lora_kernel_a", "lora_kernel_b", "_kernel"


def _lora_classes():
    import keras
    from keras.src.layers.convolutional.base_conv import BaseConv  # no public name for the conv base
    return (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding, BaseConv)


def _frozen_by(info) -> str | None:
    """Who keeps a layer's variables out of training: the layer itself or a container around it."""
    parts = info.path.split("/")
    for k, holder in enumerate(info.ancestors):
        if not getattr(holder, "trainable", True):
            return "/".join(parts[:k + 1])
    return info.path if not info.layer.trainable else None


def lora_refusal(info) -> str | None:
    """Why ``lora`` cannot give this layer adapters, or None."""
    layer, cls = info.layer, type(info.layer).__name__
    if info.composite or not isinstance(layer, _lora_classes()) or not hasattr(layer, "enable_lora"):
        return f"{info.path} ({cls}) cannot have LoRA adapters: Keras has them for Dense, EinsumDense, " \
               "Embedding and convolution layers"
    if lora_state(layer) is not None:
        return f"{info.path} already has LoRA adapters (rank {layer.lora_rank})"
    if quantization_mode(layer) is not None:
        return f"{info.path} is quantized ({quantization_mode(layer)}): add LoRA before `quantize`"
    if getattr(layer, "kernel_constraint", None) is not None or getattr(layer, "embeddings_constraint", None):
        return f"{info.path} has a kernel constraint, which Keras's LoRA cannot keep"
    frozen = _frozen_by(info)
    if frozen is not None:
        who = "it is frozen" if frozen == info.path else f"{frozen} around it is frozen"
        return f"{info.path}'s LoRA factors would not train: {who}"
    return None


def enable_lora(layer, rank: int, alpha) -> tuple:
    """Enable LoRA on a built layer with both factors zero (the caller gives A its seeded values);
    returns the (A, B) variables. Keras freezes the base kernel."""
    layer.enable_lora(rank, lora_alpha=alpha, a_initializer="zeros", b_initializer="zeros")
    a_name, b_name, _ = _factor_names(layer)
    return getattr(layer, a_name), getattr(layer, b_name)


def merge_lora(layer) -> None:
    """Fold a layer's LoRA factors into its kernel (``kernel + alpha/rank · A·B``, the value its forward
    pass uses) and disable LoRA. Keras has no public way back from ``enable_lora``: this deletes the
    factor variables as Keras's own ``quantize`` deletes a kernel (``del layer.attr``, which untracks
    the variable), and resets the attributes ``enable_lora`` set (tests/test_finetune.py checks the
    result saves and reloads as a plain layer)."""
    a_name, b_name, base_name = _factor_names(layer)
    merged = np.asarray(layer.embeddings if base_name == "_embeddings" else layer.kernel)
    base = getattr(layer, base_name)
    base.assign(merged)  # (Variable.assign casts to the variable's dtype)
    delattr(layer, a_name)
    delattr(layer, b_name)
    layer.lora_enabled = False
    layer.lora_rank = None
    layer.lora_alpha = None
    base.trainable = bool(layer.trainable)


def variable_bytes(layer) -> int:
    total = 0
    for v in layer.weights:
        total += int(np.prod(v.shape)) * numpy_dtype(v.dtype).itemsize
    return total


# ---- where a policy is saved --------------------------------------------------------------------

def policy_holder(model, info) -> tuple[str, object, str]:
    """Where the saved config records ``info``'s dtype policy: ("node", layer, path) for a node of a
    plain functional or Sequential model (its own config); ("composite", layer, path) for a sublayer of
    a composite node of such a model (the node's config, with a DTypePolicyMap keyed by the sublayer's
    path); ("model", model, path) for a layer of a Functional subclass (a keras_hub Backbone or Task:
    its config must carry the map)."""
    parts = info.path.split("/")
    last_model = max((k for k, a in enumerate(info.ancestors) if is_model(a)), default=-1)
    holder_model = info.ancestors[last_model] if last_model >= 0 else model
    holder_path = "/".join(parts[:last_model + 1])
    if model_kind(holder_model) in ("functional", "sequential"):
        inside = info.ancestors[last_model + 1:]
        if not inside:
            return "node", info.layer, info.path
        return "composite", inside[0], "/".join(parts[:last_model + 2])
    return "model", holder_model, holder_path


def _policy_map_entries(config_dtype) -> dict | None:
    """path -> serialized policy of a serialized DTypePolicyMap, else None."""
    if isinstance(config_dtype, dict) and config_dtype.get("class_name") == "DTypePolicyMap":
        return dict(config_dtype.get("config", {}).get("policy_map") or {})
    return None


def quantize_refusal(model, info, mode: str) -> str | None:
    """Why ``quantize MODE`` cannot quantize this layer (so that the file written keeps it), or None."""
    layer, cls = info.layer, type(info.layer).__name__
    if info.composite:
        return f"{info.path} ({cls}) holds other layers; select the layers inside it"
    if quantization_mode(layer) is not None:
        return f"{info.path} is already quantized ({policy_name(layer)})"
    if lora_state(layer) is not None:
        return f"{info.path} has LoRA adapters: `merge lora` first (Keras would merge and re-quantize them " \
               "at every save, and zero them at every load)"
    import keras
    if not _quantizable(layer):
        return f"{info.path} ({cls}) cannot be quantized: Keras quantizes Dense, EinsumDense and Embedding layers " \
               "(and classes that implement `quantize`)"
    if mode == "float8" and isinstance(layer, keras.layers.Embedding):
        return f"{info.path} (Embedding) cannot be quantized to float8: Keras has int8 and int4 for embeddings"
    kind, holder, holder_path = policy_holder(model, info)
    if kind == "model" and not _saves_sublayer_policies(holder):
        return f"{info.path} is inside {holder_path or 'the model'} ({type(holder).__name__}), whose saved " \
               "config does not record its layers' dtype policies: the file written would not load"
    return None


def _quantizable(layer) -> bool:
    """Whether ``layer.quantize`` is implemented for the layer's class: Keras's Dense, EinsumDense and
    Embedding refuse their subclasses unless these define ``quantize`` themselves (keras_hub's
    ReversibleEmbedding does)."""
    import keras
    owner = next((c for c in type(layer).__mro__ if "quantize" in c.__dict__), None)
    if owner is None or owner is keras.layers.Layer:
        return False
    if owner in (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding):
        return type(layer) is owner
    return True


def _saves_sublayer_policies(model) -> bool:
    """Whether a Functional subclass's config records its layers' quantized policies (keras_hub's
    Backbone does, in a DTypePolicyMap under `dtype`; a Task does not for its head)."""
    try:
        config = model.get_config()
    except Exception:  # noqa: BLE001 - a model that cannot say cannot be trusted to save it
        return False
    return "dtype" in config


def quantize(model, info, mode: str, block_size: int | None) -> None:
    """Quantize one layer in place with Keras's own ``layer.quantize`` and make the saved config record
    its policy (see the module docstring)."""
    import keras
    config = None
    if mode == "int4" and block_size is not None:
        config = keras.quantizers.Int4QuantizationConfig(block_size=None if block_size == -1 else block_size)
    layer = info.layer
    unshare_policy(layer)
    layer.quantize(mode, config=config)
    kind, holder, _ = policy_holder(model, info)
    if kind == "composite" or (kind == "model" and isinstance(holder.dtype_policy,
                                                              keras.dtype_policies.DTypePolicyMap)):
        _record_in_map(holder, layer.path, layer.dtype_policy)


def unshare_policy(layer) -> bool:
    """Give a layer built with a DTypePolicyMap (inside a keras_hub Backbone or a composite layer whose
    config holds one) its own entry of the map as its policy. Keras 3.15 reads
    ``layer.dtype_policy.quantization_mode`` in places where it means the layer's own mode: a map's is
    its default's, so a quantized layer holding the map saves no scale (``model.save`` fails with
    "Invalid dtype: object": a loaded quantized Backbone cannot be saved again) and names its quantized
    policy ``int8_from_map_float32`` (quantizing it fails). The map stays with the model or composite
    layer that saves it; the layer's own compute and variable dtypes do not change. Writes the private
    ``_dtype_policy`` (the public setter would write into the map); tests/test_finetune.py checks both
    the bug and the remedy."""
    import keras
    policy = getattr(layer, "_dtype_policy", None)
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap) and getattr(layer, "path", None):
        layer._dtype_policy = policy[layer.path]
        return True
    return False


def unshare_policies(model) -> None:
    """:func:`unshare_policy` for every leaf layer of a model (its layers that hold no other layers)."""
    for layer in model._flatten_layers(include_self=False):
        if not any(True for _ in layer._flatten_layers(include_self=False)):
            unshare_policy(layer)


def _record_in_map(holder, path: str, policy) -> None:
    """Give a composite node a DTypePolicyMap (through the public dtype_policy setter) holding
    ``path``'s policy, so that its config saves it and its build passes it on."""
    import keras
    current = holder.dtype_policy
    if isinstance(current, keras.dtype_policies.DTypePolicyMap):
        if path in current:
            del current[path]
        current[path] = policy
        return
    holder.dtype_policy = keras.dtype_policies.DTypePolicyMap(default_policy=current, policy_map={path: policy})


def reset_functions(model) -> None:
    """What Model.quantize does after quantizing: the traced train/test/predict functions are stale."""
    for name in ("train_function", "test_function", "predict_function"):
        if hasattr(model, name):
            setattr(model, name, None)


# ---- cast: policies written into the config, then one rebuild ------------------------------------

def cast_refusal(model, info, policy: str) -> str | None:
    layer = info.layer
    if quantization_mode(layer) is not None:
        return f"{info.path} is quantized ({policy_name(layer)}): cast before `quantize`"
    if lora_state(layer) is not None:
        return f"{info.path} has LoRA adapters: cast before `lora`, or `merge lora` first"
    if model_kind(model) == "subclassed":
        return f"the model is a subclassed model ({type(model).__name__}): its layers' dtype policies are " \
               "Python code, not config"
    kind, holder, holder_path = policy_holder(model, info)
    if kind == "model" and "dtype" not in _config_or_empty(holder):
        return f"{info.path} is inside {holder_path or 'the model'} ({type(holder).__name__}), whose saved " \
               "config does not record its layers' dtype policies"
    return None


def _config_or_empty(model) -> dict:
    try:
        return model.get_config()
    except Exception:  # noqa: BLE001
        return {}


def cast_plan(model, infos, policy: str) -> dict:
    """holder path -> (kind, holder, {Keras path of a layer: policy} or None) for the selected layers,
    where ``policy_holder`` says each one's policy is saved; a composite or Functional subclass all of
    whose layers with weights are selected takes the policy itself (None: no map)."""
    plan: dict = {}
    all_infos = walk(model)
    for info in infos:
        kind, holder, holder_path = policy_holder(model, info)
        entry = plan.setdefault(holder_path, (kind, holder, {}))
        if kind != "node":
            entry[2][info.layer.path] = policy
    selected = {i.path for i in infos}
    for key, (kind, holder, entries) in list(plan.items()):
        if kind == "node":
            continue
        under = [i for i in all_infos if i.weights and (not key or i.path.startswith(key + "/"))]
        if under and all(i.path in selected for i in under):
            plan[key] = (kind, holder, None)
    return plan


def apply_cast(editor, plan: dict, policy: str, model) -> None:
    """Write the policies of :func:`cast_plan` into the graph editor's copy of the config: a node's
    ``dtype`` is the policy; a composite node's or a Functional subclass's ``dtype`` becomes a
    DTypePolicyMap merged with the one it has (a Backbone's config holds one of its quantized layers),
    or the policy itself when all its layers are cast."""
    import keras
    plain = keras.dtype_policies.serialize(keras.DTypePolicy(policy))
    for key, (kind, holder, entries) in plan.items():
        target = _holder_config(editor, key, holder, model)
        if kind == "node" or entries is None:
            target["dtype"] = plain
            continue
        current = target.get("dtype")
        existing = _policy_map_entries(current)
        if existing is not None:
            default = current.get("config", {}).get("default_policy")
        else:
            default, existing = (current if current is not None else "float32"), {}
        for path in entries:
            existing[path] = plain
        target["dtype"] = {"module": "keras.dtype_policies", "class_name": "DTypePolicyMap",
                           "config": {"default_policy": default, "policy_map": existing}, "registered_name": None}


def _holder_config(editor, path: str, holder, model) -> dict:
    """The config dict of the layer or model at ``path`` in the editor's config: the model's own, a
    node's entry, or (a keras_hub Task's backbone, which is no node) the serialized object of that class
    and name inside the config."""
    if holder is model or not path:
        return editor.config["config"]
    try:
        return editor.entry(path)["config"]
    except (ApplyError, KeyError):  # no node of a graph the config lists (a Task's backbone)
        pass
    cls, name = type(holder).__name__, holder.name

    def search(obj):
        if isinstance(obj, dict):
            inner = obj.get("config")
            if obj.get("class_name") == cls and isinstance(inner, dict) and inner.get("name") == name:
                return inner
            return next((found for found in map(search, obj.values()) if found is not None), None)
        if isinstance(obj, list):
            return next((found for found in map(search, obj) if found is not None), None)
        return None
    found = search(editor.config["config"])
    if found is None:
        raise ApplyError(f"cast: cannot find {path} in the model's config")
    return found


def has_lora(model) -> list[str]:
    """Paths of the LoRA-enabled layers."""
    return [i.path for i in walk(model) if lora_state(i.layer) is not None]


# ---- LoRA factors in the saved file --------------------------------------------------------------

def lora_member(model) -> bytes | None:
    """The member ``modelxform.lora.h5`` for ``model``, or None when no layer has LoRA: for every LoRA
    layer (by its modelxform path) its rank, alpha, Keras class and path, the factors ``a`` and ``b``,
    and — when ``b`` is not all zeros, so the file's kernel is the merged one — the unmerged ``kernel``.
    Written with h5py into memory, reproducibly (no timestamps, fixed layout)."""
    entries = [i for i in walk(model) if lora_state(i.layer) is not None]
    if not entries:
        return None
    import h5py
    buffer = io.BytesIO()
    index = []
    with h5py.File(buffer, "w") as h5:
        h5.attrs["format"] = LORA_FORMAT
        for n, info in enumerate(entries):
            layer = info.layer
            rank, alpha = lora_state(layer)
            a_name, b_name, base_name = _factor_names(layer)
            a = np.asarray(getattr(layer, a_name).numpy())
            b = np.asarray(getattr(layer, b_name).numpy())
            group = h5.create_group(str(n))
            group.create_dataset("a", data=a, track_times=False)
            group.create_dataset("b", data=b, track_times=False)
            record = {"path": info.path, "keras_path": layer.path, "class": type(layer).__name__,
                      "rank": rank, "alpha": alpha, "a": a_name, "b": b_name, "unmerged_kernel": False}
            if np.any(b != 0):
                base = getattr(layer, base_name)
                value = np.asarray(base.numpy())
                if str(base.dtype) == "bfloat16":
                    value = value.view(np.uint16)  # (h5py has no bfloat16; the index says what it is)
                group.create_dataset("kernel", data=value, track_times=False)
                record["unmerged_kernel"] = True
                record["kernel_dtype"] = str(base.dtype)
            index.append(record)
        h5.attrs["layers"] = json.dumps(index)
    return buffer.getvalue()


def read_lora_member(path) -> tuple[list, dict] | None:
    """(index, path -> {"a", "b", "kernel"?} arrays) of a .keras file's LoRA member, or None."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as zf:
            if LORA_MEMBER not in zf.namelist():
                return None
            data = zf.read(LORA_MEMBER)
    except (OSError, zipfile.BadZipFile):
        return None
    import h5py
    with h5py.File(io.BytesIO(data), "r") as h5:
        if h5.attrs.get("format") != LORA_FORMAT:
            raise ValueError(f"{LORA_MEMBER}: unknown format {h5.attrs.get('format')!r}")
        index = json.loads(h5.attrs["layers"])
        arrays = {}
        for n, record in enumerate(index):
            group = h5[str(n)]
            arrays[record["path"]] = {k: group[k][()] for k in group.keys()}
    return index, arrays


def restore_lora(model, path) -> list[str]:
    """Put back the LoRA layers of a .keras file written by modelxform: enable LoRA where Keras's loader
    did not (sublayers, keras_hub Backbones), give Dense and Embedding their alpha back, and assign the
    factors (and the unmerged kernel, when the file keeps one). Returns the paths restored; a file
    without the member is left as Keras loaded it."""
    read = read_lora_member(path)
    if read is None:
        return []
    index, arrays = read
    by_path = {i.path: i.layer for i in walk(model)}
    done = []
    for record in index:
        layer = by_path.get(record["path"])
        if layer is None:
            raise ValueError(f"{LORA_MEMBER}: no layer {record['path']!r} in the loaded model")
        state = lora_state(layer)
        if state is None:
            layer.enable_lora(record["rank"], lora_alpha=record["alpha"], a_initializer="zeros",
                              b_initializer="zeros")
        elif state[0] != record["rank"]:
            raise ValueError(f"{LORA_MEMBER}: {record['path']} has rank {state[0]}, the file says {record['rank']}")
        layer.lora_alpha = record["alpha"]  # Dense and Embedding build with alpha = rank (a Keras bug)
        data = arrays[record["path"]]
        getattr(layer, record["a"]).assign(data["a"])
        getattr(layer, record["b"]).assign(data["b"])
        if record.get("unmerged_kernel"):
            _, _, base_name = _factor_names(layer)
            value = data["kernel"]
            if record.get("kernel_dtype") == "bfloat16":
                value = value.view(numpy_dtype("bfloat16"))
            getattr(layer, base_name).assign(value)
        done.append(record["path"])
    return done


def copy_lora_structure(source_infos, target_model) -> None:
    """Enable LoRA on ``target_model``'s layers where the same paths in ``source_infos`` have it and the
    target does not (a model rebuilt from its config loses its sublayers' LoRA), so that their
    variables line up for a copy."""
    by_path = {i.path: i.layer for i in walk(target_model)}
    for info in source_infos:
        state = lora_state(info.layer)
        target = by_path.get(info.path)
        if state is None or target is None:
            continue
        if lora_state(target) is None:
            target.enable_lora(state[0], lora_alpha=state[1], a_initializer="zeros", b_initializer="zeros")
        target.lora_alpha = state[1]
        _, _, base_name = _factor_names(target)
        getattr(target, base_name).trainable = False
