"""
The released checkpoints of the official code (lumalabs/tvm: im256_w2.pkl, im256_w1p75.pkl, im512_w2p5.pkl),
read without importing or running anything from them, and converted to tvm.DiT. This file is the one
place where a file from outside is unpickled: load_official is the security boundary, auditable on its own.
sample.py uses it: python sample.py --ckpt im256_w2.pkl --n 64 (README, 'Use the released models').
"""

import dataclasses
import functools
import io
import math
import os
import pickle
import warnings
import zipfile
from collections import OrderedDict

import torch

import tvm
from data import LATENT_STATS, SampleError
from train import TrainConfig, load_model_from_checkpoint, save_checkpoint


# ------------------------------------------------------------------------------------------------
# The released checkpoints of the official code (lumalabs/tvm), read without running any of it
# ------------------------------------------------------------------------------------------------
#
# An official snapshot (im256_w2.pkl, ...) is a plain pickle.dump of dict(ema=network, ...) (or net=).
# Its network classes are "persistent" (StyleGAN's torch_utils.persistence): each object is pickled as a
# call of torch_utils.persistence._reconstruct_persistent_obj(meta), and meta carries the whole source
# file of the object's module, which the official loader executes. pickle.load would run it, and any
# other callable the file names. We read the file with an unpickler that admits only
#   - the torch functions that rebuild tensors and parameters, and storages through
#     torch.load(weights_only=True) on the CPU;
#   - a few plain values: OrderedDict, set, torch dtypes, torch.Size, torch.device;
#   - inert stand-ins (StandIn) for every other object these files hold: the persistent objects, timm's
#     and torch.nn's layers, omegaconf configs, torch.compile's wrapper and its dynamo contexts. A stand-in
#     records what the pickle hands it and runs nothing of the class it stands for;
# and refuses any other global, by name. The weights are then collected from the stand-ins' recorded
# module state (_parameters, _buffers, _modules), exactly as nn.Module.state_dict would name them, and
# renamed to tvm.DiT's names (OFFICIAL_RENAMES).

# Table of the released files (paper Table 1 and the official configs): the recommended sampling.
RELEASED = {
    "im256_w2.pkl": dict(steps=1, w=2.0, scale_param=True, paper_fid=3.29),
    "im256_w1p75.pkl": dict(steps=4, w=1.75, scale_param=True, paper_fid=1.99),
    "im512_w2p5.pkl": dict(steps=1, w=2.5, scale_param=False, paper_fid=4.32),
}
RELEASED_LICENCE = "CC BY-NC-SA 4.0 (the weights' licence, set by their authors; not this code's licence)"


class OfficialCheckpointError(SampleError):
    """An official pickle that cannot be read, or that holds something this loader refuses to build."""


class StandIn:
    """An inert record of an object whose class is never imported: the arguments and the state that the
    pickle gives it. One subclass per global name (standin_class), so a record says what it stands for."""
    global_name = "?"

    def __new__(cls, *args, **kwargs):   # pickle's NEWOBJ calls cls.__new__(cls, *args); REDUCE cls(*args)
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):       # pickle's BUILD: (a copy of) the object's __dict__
        self.state = state

    def __setitem__(self, key, value):   # SETITEM(S) on a dict-like object (omegaconf's defaultdicts)
        self.items.append((key, value))

    def append(self, value):             # APPEND(S) on a list-like object
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self):
        return f"<stand-in for {self.global_name}>"


@functools.lru_cache(maxsize=None)
def standin_class(global_name):
    return type(global_name.rsplit(".", 1)[-1], (StandIn,), {"global_name": global_name})


class PersistentStandIn(StandIn):
    global_name = "torch_utils.persistence._reconstruct_persistent_obj"


def _reconstruct_persistent_obj(meta):
    """In place of the official function of that name, which executes meta["module_src"] to recreate the
    class: keep the class name and the object's state, drop the source unread."""
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("a persistent object without the expected meta dict (type, version, "
                                     "module_src, class_name, state)")
    obj = PersistentStandIn()
    obj.class_name, obj.state = str(meta.get("class_name")), meta["state"]
    return obj


def _getattr_on_standin(obj, name):
    """builtins.getattr, as the pickles use it: torch.compile's wrapper holds bound methods (e.g. its
    inductor wrapper's get_compiler_config), which pickle writes as getattr(instance, name). Admitted only
    on a stand-in, and it returns another stand-in: no real attribute is ever looked up, so
    getattr(os, "system") and the like cannot be reached."""
    if not isinstance(obj, StandIn) or not isinstance(name, str):
        raise pickle.UnpicklingError(f"refused builtins.getattr({type(obj).__name__} object, {name!r}): "
                                     "getattr is admitted only on the inert stand-ins of this loader")
    return standin_class(f"{obj.global_name}.{name}")(obj, name)


def _load_storage_from_bytes(b):
    """In place of torch.storage._load_from_bytes, which is torch.load(weights_only=False) of the bytes
    (pickle.dump writes every storage as a legacy torch.save of it). The same bytes, read with
    weights_only=True, onto the CPU: storages saved from CUDA tensors carry the location 'cuda:N'."""
    if not isinstance(b, bytes):
        raise pickle.UnpicklingError(f"torch.storage._load_from_bytes of a {type(b).__name__}, expected bytes")
    with warnings.catch_warnings():      # TypedStorage is deprecated; it is what these files hold
        warnings.simplefilter("ignore", UserWarning)
        storage = torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a storage record holds a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 with its arguments checked: a real storage, no hooks."""
    if not isinstance(storage, torch.storage.TypedStorage) or backward_hooks:
        raise pickle.UnpicklingError("a tensor record with a non-storage source or with backward hooks")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state), checked; extra Python state of a parameter is
    dropped (setting arbitrary attributes is what that state does)."""
    if not isinstance(data, torch.Tensor) or backward_hooks:
        raise pickle.UnpicklingError("a parameter record that is not a tensor, or has backward hooks")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


_TORCH_DTYPES = {n for n, v in vars(torch).items() if isinstance(v, torch.dtype)}   # float32, ...
_ADMITTED = {   # global -> what it becomes
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct_persistent_obj,
    "torch.storage._load_from_bytes": _load_storage_from_bytes,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "builtins.getattr": _getattr_on_standin,
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
}
# Globals met in the official files that become inert stand-ins: the official modules (training.*),
# timm's Mlp / PatchEmbed / Format, torch.nn layers, omegaconf configs (dataset_kwargs, attributes) and
# the type names their metadata refers to, torch.compile's OptimizedModule and dynamo contexts.
_STANDIN_PREFIXES = ("training.", "timm.", "torch.nn.modules.", "torch._dynamo.", "omegaconf.")
_STANDIN_NAMES = {"torch._TorchCompileInductorWrapper", "contextlib.nullcontext", "typing.Any",
                  "collections.defaultdict", "builtins.dict", "builtins.list", "builtins.tuple",
                  "builtins.int", "builtins.float", "builtins.str", "builtins.bool", "builtins.object"}


class _OfficialUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in _ADMITTED:
            return _ADMITTED[full]
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        if full in _STANDIN_NAMES or full.startswith(_STANDIN_PREFIXES):
            return standin_class(full)
        raise pickle.UnpicklingError(f"refused global {full}: it is not among the globals an official TVM "
                                     "snapshot holds, and this loader builds nothing else")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id: official snapshots have none")


def _module_state(obj):
    """The __dict__ that a stand-in of a torch module recorded (BUILD may give (state, slotstate))."""
    state = obj.state if isinstance(obj, StandIn) else None
    if isinstance(state, tuple) and len(state) == 2:
        state = state[0]
    return state if isinstance(state, dict) else {}


def _children(obj):
    """{name: child} of a stand-in module. torch.compile's OptimizedModule holds the real module as
    _orig_mod: in _modules (older torch), in its __dict__, or (torch >= 2.6, whose __reduce__ is
    (OptimizedModule, (module, dynamo_ctx))) as its first argument."""
    state = _module_state(obj)
    children = {k: v for k, v in (state.get("_modules") or {}).items() if v is not None}
    if obj.global_name.endswith(".OptimizedModule") and "_orig_mod" not in children:
        orig = state.get("_orig_mod", obj.args[0] if obj.args else None)
        if orig is not None:
            children["_orig_mod"] = orig
    return children


def _state_dict(obj, prefix=""):
    """{name: tensor} of a stand-in module tree, named as nn.Module.state_dict() names them."""
    state, out = _module_state(obj), {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for k, v in (state.get(kind) or {}).items():
            if v is None or (kind == "_buffers" and k in skip):
                continue
            if not isinstance(v, torch.Tensor):
                raise OfficialCheckpointError(f"{prefix}{k} holds a {type(v).__name__}, not a tensor")
            out[prefix + k] = v
    for k, child in _children(obj).items():
        out.update(_state_dict(child, f"{prefix}{k}."))
    return out


def _find_attribute(obj, name):
    """The first value of attribute `name` in the module tree, searched breadth first (the official
    wrapper holds img_resolution, img_channels, label_dim, do_scale_param)."""
    queue = [obj]
    while queue:
        obj = queue.pop(0)
        if name in _module_state(obj):
            return _module_state(obj)[name]
        queue += list(_children(obj).values())
    return None


# Official name -> tvm.DiT name, applied in order to "." + key (checked on all 356 keys of XL/2-18h).
OFFICIAL_RENAMES = ((".x_embedder.proj.", ".x_embedder."), (".s_embedder.", ".gap_embedder."),
                    (".guidance_embedder.", ".w_embedder."), (".y_embedder.embedding_table.", ".y_embedder."),
                    (".mlp.fc1.", ".mlp.0."), (".mlp.fc2.", ".mlp.2."), (".adaLN_modulation.1.", ".adaLN."))


def official_to_ours(key):
    """One official state-dict key -> tvm.DiT's: drop torch.compile's "_orig_mod." and the wrapper's
    "model.", then OFFICIAL_RENAMES. Every other name is already the same. None for a key outside the
    wrapped DiT (the wrapper itself holds no weights)."""
    key = "." + key.replace("_orig_mod.", "")
    if not key.startswith(".model."):
        return None
    key = key[len(".model"):]
    for old, new in OFFICIAL_RENAMES:
        key = key.replace(old, new)
    return key[1:]


def official_state_dict(sd, label_dim):
    """Official {key: tensor} -> tvm.DiT's. The label table keeps rows 0..label_dim: the official one
    has num_classes + 1 rows (num_classes defaults to 1000) and row label_dim is its null class, which
    is ours too (y == num_classes)."""
    out = {}
    for key, value in sd.items():
        ours = official_to_ours(key)
        if ours is None:
            raise OfficialCheckpointError(f"unexpected weight {key!r} outside the wrapped DiT (model.*)")
        out[ours] = value
    table = out.get("y_embedder.weight")
    if table is not None:
        if table.shape[0] < label_dim + 1:
            raise OfficialCheckpointError(f"the label table has {table.shape[0]} rows, fewer than label_dim + 1 "
                                          f"= {label_dim + 1} (label_dim classes and the null class)")
        out["y_embedder.weight"] = table[:label_dim + 1]
    return out


def dit_kwargs_from_state_dict(sd):
    """tvm.DiT's constructor arguments read off the shapes of its state dict."""
    try:
        hidden, patch = sd["pos_embed"].shape[-1], sd["x_embedder.weight"].shape[-1]
        grid = math.isqrt(sd["pos_embed"].shape[1])
        head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
        return dict(input_size=grid * patch, patch_size=patch, in_channels=sd["x_embedder.weight"].shape[1],
                    hidden_size=hidden, depth=sum(1 for k in sd if k.startswith("blocks.") and k.endswith(".adaLN.weight")),
                    num_heads=hidden // head_dim, mlp_ratio=sd["blocks.0.mlp.0.weight"].shape[0] / hidden,
                    num_classes=sd["y_embedder.weight"].shape[0] - 1)
    except KeyError as e:
        raise OfficialCheckpointError(f"no weight {e} after renaming: not a DiT of the official layout") from None


def is_official_pickle(path):
    """A plain pickle (protocol >= 2 starts with 0x80), not our torch.save zip archive."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80" and not zipfile.is_zipfile(path)


def load_official(path, device="cpu"):
    """Read a released official snapshot (im256_w2.pkl, ...) without importing or executing anything
    from it -> (tvm.DiT in eval mode on `device`, info dict). info: file, key ("ema" or "net"), compiled
    (whether a torch.compile wrapper was unwrapped), img_resolution (latent side), img_channels,
    label_dim, res (pixels: 8 x the side for 4-channel SD-VAE latents, 0 for pixel models), scale_param
    (the pickle's do_scale_param), dit (constructor arguments), and the recommended steps, w and the
    paper's FID of the released file of that name (None, with known=False, for other names)."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = _OfficialUnpickler(f).load()
    except FileNotFoundError:
        raise OfficialCheckpointError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError,
            KeyError, RuntimeError) as e:
        hint = (" The file ends early: an interrupted download? Compare its size with the published one."
                if isinstance(e, EOFError) or "truncated" in str(e) else "")
        raise OfficialCheckpointError(f"{path}: not read as an official TVM snapshot ({type(e).__name__}: "
                                      f"{e}). Nothing in it was executed.{hint}") from None
    key = next((k for k in ("ema", "net") if isinstance(data, dict) and k in data), None)
    if key is None:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise OfficialCheckpointError(f"{path}: expected a dict with the network under 'ema' or 'net', found {found}")
    root = data[key]
    raw = _state_dict(root)
    if not raw:
        raise OfficialCheckpointError(f"{path}: data[{key!r}] holds no weights")

    label_dim = _find_attribute(root, "label_dim")
    rows = next((v.shape[0] for k, v in raw.items() if k.endswith("y_embedder.embedding_table.weight")), None)
    if label_dim is None and rows is not None:
        label_dim = rows - 1
    if not isinstance(label_dim, int):
        raise OfficialCheckpointError(f"{path}: label_dim is {label_dim!r}, expected an integer")
    sd = official_state_dict(raw, label_dim)
    kwargs = dit_kwargs_from_state_dict(sd)
    # A cross-check of the wrapper's attributes against the weights' shapes. img_resolution is taken as the
    # network's input side (latents) or as the pixel side (8x), whichever the official wrapper records.
    side, channels = _find_attribute(root, "img_resolution"), _find_attribute(root, "img_channels")
    S, C = kwargs["input_size"], kwargs["in_channels"]
    if (channels is not None and channels != C) or (side is not None and side not in (S, 8 * S)):
        raise OfficialCheckpointError(f"{path}: the wrapper says {channels} channels at resolution {side}, the "
                                      f"weights take {C} x {S} x {S} inputs: not a consistent snapshot")

    release = RELEASED.get(name)
    scale_param = _find_attribute(root, "do_scale_param")
    if not isinstance(scale_param, bool):
        if release is None:
            raise OfficialCheckpointError(f"{path}: do_scale_param is {scale_param!r}, not true or false, and "
                                          f"{name} is not one of the released files {sorted(RELEASED)}")
        scale_param = release["scale_param"]

    with torch.device("meta"):           # no initialisation: every tensor comes from the file
        net = tvm.DiT(**kwargs)
    try:
        net.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise OfficialCheckpointError(f"{path}: the weights do not fit tvm.DiT({kwargs}): {e}") from None
    net = net.to(device).eval().requires_grad_(False)
    latent = kwargs["in_channels"] == 4
    info = dict(file=name, key=key, compiled=any(k.startswith("_orig_mod.") for k in raw),
                img_resolution=kwargs["input_size"], img_channels=kwargs["in_channels"], label_dim=label_dim,
                res=8 * kwargs["input_size"] if latent else 0, scale_param=scale_param, dit=kwargs,
                known=release is not None, steps=release and release["steps"], w=release and release["w"],
                paper_fid=release and release["paper_fid"])
    return net, info


def official_config(info):
    """A train.py config dict for a loaded official network, as sample.py and checkpoints use it."""
    kw = info["dit"]
    if kw["patch_size"] != 2 or kw["mlp_ratio"] != 4.0:
        raise OfficialCheckpointError(f"patch {kw['patch_size']}, MLP ratio {kw['mlp_ratio']}: train.py's configs "
                                      "describe patch 2 and ratio 4 only, so this network has no config of ours")
    if info["res"] not in (0, *LATENT_STATS):
        raise OfficialCheckpointError(f"{info['img_channels']}-channel {info['img_resolution']} x "
                                      f"{info['img_resolution']} latents ({info['res']} px): train.py knows the "
                                      f"SD-VAE latent statistics of {sorted(LATENT_STATS)} px only")
    xl = {k: kw[k] for k in ("hidden_size", "depth", "num_heads")} == {
        k: tvm.DIT_CONFIGS["XL/2-18h"][k] for k in ("hidden_size", "depth", "num_heads")}
    cfg = dataclasses.asdict(TrainConfig())
    cfg.update(res=info["res"], data=None, model="XL/2-18h" if xl else "tiny", depth=kw["depth"],
               hidden_size=kw["hidden_size"], num_heads=kw["num_heads"], input_size=kw["input_size"],
               in_channels=kw["in_channels"], num_classes=info["label_dim"], w=info["w"],
               scale_param=info["scale_param"], steps=0)
    return cfg


def save_converted(net, info, path):
    """Write a loaded official network as a train.py checkpoint (weights and config; loadable with
    torch.load(weights_only=True), and by sample.py like any of ours). ema = target = model: the file holds
    one network (the evaluation EMA); opt is empty and step 0, so it samples but does not resume."""
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint(dict(config=official_config(info), model=sd, ema=sd, target=sd, opt={}, step=0,
                               converted_from=dict(info, dit=dict(info["dit"]))), path)
    return path


def load_any(path, which="ema", device="cpu"):
    """-> (network, config dict, info or None): a train.py checkpoint, or an official pickle (detected by
    its content, not its name)."""
    if not is_official_pickle(path):
        net, config = load_model_from_checkpoint(path, which=which, device=device)
        return net, config, None
    if which != "ema":
        raise SampleError(f"--which {which}: {path} is an official snapshot, which holds one network (the EMA)")
    net, info = load_official(path, device)
    return net, official_config(info), info
