"""
The released checkpoints of the official code (lumalabs/tvm: im256_w2.pkl, im256_w1p75.pkl, im512_w2p5.pkl),
read without importing or running anything from them, and converted to tvm.DiT. This file is the one
place where a file from outside is unpickled: load_official is the security boundary, auditable on its own.
sample.py uses it: python sample.py --ckpt im256_w2.pkl --n 64 (README, 'The released official models').
Whatever the file holds, reading it takes time and memory bounded by its size (the limit table below), and
a file that is refused gets one sentence that names the cause (sample.py: exit status 2).
"""

import dataclasses
import io
import math
import mmap
import os
import pickletools
import zipfile
from collections import OrderedDict

import torch

import tvm
from config import TrainConfig
from data import LATENT_STATS, SampleError
from train import load_model_from_checkpoint, save_checkpoint
from tvm import DIT_LIMITS, MAX_PARAMS   # the sizes a network may have


# ------------------------------------------------------------------------------------------------
# The released checkpoints of the official code (lumalabs/tvm), read without running any of it
# ------------------------------------------------------------------------------------------------
#
# An official snapshot (im256_w2.pkl, ...) is a plain pickle.dump of dict(ema=network, ...) (or net=).
# Its network classes are "persistent" (StyleGAN's torch_utils.persistence): each object is pickled as a
# call of torch_utils.persistence._reconstruct_persistent_obj(meta), and meta carries the whole source
# file of the object's module, which the official loader executes. pickle.load would run it, and any
# other callable the file names. We do not give the file to pickle at all: our own loop (_Reader.run)
# carries out its opcodes, as parsed by pickletools.genops, and admits only
#   - the torch functions that rebuild tensors and parameters, and storages, each checked (every tensor
#     lies in bytes of the file);
#   - a few plain values: OrderedDict, set, torch dtypes, torch.Size, torch.device;
#   - inert stand-ins (StandIn) for every other object these files hold: the persistent objects, timm's
#     and torch.nn's layers, omegaconf configs, torch.compile's wrapper and its dynamo contexts. A stand-in
#     records what the pickle hands it and runs nothing of the class it stands for;
# and refuses any other global, by name. Only a stand-in takes state (BUILD): the file cannot change the
# functions, classes, tensors or containers this loader gives it. The weights are then collected from the
# stand-ins' recorded module state (_parameters, _buffers, _modules), exactly as nn.Module.state_dict would
# name them, and renamed to tvm.DiT's names (OFFICIAL_RENAMES).

# Table of the released files (paper Table 1 and the official configs): the recommended sampling.
RELEASED = {
    "im256_w2.pkl": dict(steps=1, w=2.0, scale_param=True, paper_fid=3.29),
    "im256_w1p75.pkl": dict(steps=4, w=1.75, scale_param=True, paper_fid=1.99),
    "im512_w2p5.pkl": dict(steps=1, w=2.5, scale_param=False, paper_fid=4.32),
}
RELEASED_LICENCE = "CC BY-NC-SA 4.0 (the weights' licence, set by their authors; not this code's licence)"

# ------------------------------------------------------------------------------------------------
# Limits: what a file may make this loader do. Each is far above what a released file needs (measured on
# an official-layout pickle of DiT-XL/2-18h: ~65,000 opcodes, ~30 globals, ~600 modules, depth 7) and
# keeps the work linear in the file's size: memo slots, declared lengths, tensors and storages are in
# addition bounded by the file itself (see _Reader).
# ------------------------------------------------------------------------------------------------
MAX_STEPS = 1_000_000        # opcodes carried out, plus one per element that an admitted call copies
MAX_GLOBALS = 1_000          # distinct global names (each stand-in is a class of its own)
MAX_CALL_ARGS = 16           # arguments of one call (REDUCE, NEWOBJ); a tensor record has 6
MAX_NAME = 200               # characters of a global's name, and of a module, parameter or buffer name
MAX_TENSOR_DIMS = 8          # dimensions of one tensor (the DiT's have at most 4)
MAX_MODULES = 10_000         # modules in the network's tree (XL/2: ~600)
MAX_DEPTH = 16               # nesting of modules (compiled wrapper > wrapper > DiT > blocks > i > attn > qkv: 7)
# The network a file declares must be a tvm.DiT within tvm.DIT_LIMITS and MAX_PARAMS, imported above
# (XL/2-18h: input 32 or 64, patch 2, 4 channels, hidden 1152, depth 28, 18 heads, 1000 classes, 678M
# parameters).

class OfficialCheckpointError(SampleError):
    """An official pickle that cannot be read, or that holds something this loader refuses to build. The
    message is one sentence; whatever of the file it quotes is shortened (_show, _names)."""


def _show(value):
    """A value from the file, for a message: short, and never the repr of a container (a file can share
    parts of a container so that its repr takes exponential time)."""
    if value is None or type(value) in (bool, float) or (type(value) is int and value.bit_length() <= 64):
        return repr(value)
    if type(value) is int:
        return f"an integer of {value.bit_length()} bits"
    if type(value) is str:
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    kind = type(value).__name__
    return ("an " if kind[:1].lower() in "aeiou" else "a ") + kind


def _text(text, limit=200):
    """Text of the file (or of an error about it) for a message: at most `limit` characters, control and other
    unprintable characters escaped as repr escapes them (a name holding a newline or an ANSI escape code
    cannot break the message into lines or drive the terminal)."""
    text = repr(str(text)[:limit + 1])[1:-1]
    return text[:limit] + "..." if len(text) > limit else text


def _names(names, shown=3):
    """The first few of a list of names, then how many more: 'a', 'b', 'c' and 199997 more."""
    text = ", ".join(_show(n) for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


class StandIn:
    """An inert record of an object whose class is never imported: the arguments and the state that the
    pickle gives it. One subclass per global name (_Reader.find_global), so a record says what it stands
    for."""
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


class PersistentStandIn(StandIn):
    global_name = "torch_utils.persistence._reconstruct_persistent_obj"


class AttributeStandIn(StandIn):
    """getattr(stand-in, name): args = (the stand-in, name). One class for all (a class per attribute name
    would let a chain of getattrs build ever longer class names)."""
    global_name = "builtins.getattr"


def _reconstruct_persistent_obj(meta):
    """In place of the official function of that name, which executes meta["module_src"] to recreate the
    class: keep the class name and the object's state, drop the source unread."""
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict) or type(meta.get("class_name")) is not str:
        raise OfficialCheckpointError("a persistent object without the expected meta dict (type, version, "
                                      "module_src, class_name, state)")
    obj = PersistentStandIn()
    obj.class_name, obj.state = meta["class_name"][:MAX_NAME], meta["state"]
    return obj


def _getattr_on_standin(obj, name):
    """builtins.getattr, as the pickles use it: torch.compile's wrapper holds bound methods (e.g. its
    inductor wrapper's get_compiler_config), which pickle writes as getattr(instance, name). Admitted only
    on a stand-in, and it returns another stand-in: no real attribute is ever looked up, so
    getattr(os, "system") and the like cannot be reached."""
    if not isinstance(obj, StandIn) or type(name) is not str or len(name) > MAX_NAME:
        raise OfficialCheckpointError(f"refused builtins.getattr({_show(obj)}, {_show(name)}): getattr is "
                                      "admitted only on the inert stand-ins of this loader")
    return AttributeStandIn(obj, name)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state), checked; extra Python state of a parameter is
    dropped (setting arbitrary attributes is what that state does)."""
    if not isinstance(data, torch.Tensor) or type(requires_grad) is not bool or backward_hooks:
        raise OfficialCheckpointError("a parameter record that is not a tensor, or has backward hooks")
    return torch.nn.Parameter(data, requires_grad=requires_grad)


def _check_keys(keys):
    """Dict keys and set members must be values whose hash the file cannot choose: Python salts the hashes
    of str and bytes per process, small ints hash to themselves, a stand-in by its identity. A file could
    otherwise pick ints, floats or tuples of equal hash and make each insertion cost the size of the dict
    (the official files key their dicts by names)."""
    for key in keys:
        if not (type(key) in (str, bytes, bool) or key is None or isinstance(key, StandIn)
                or (type(key) is int and -2**31 < key < 2**31)):
            raise OfficialCheckpointError(f"a dict key or set member {_show(key)}: these files key their dicts by "
                                          "names, and a key whose hash the file could choose is refused")


def _ordered_dict(*args):
    """collections.OrderedDict: pickle writes OrderedDict() and fills it with SETITEMS (whose keys are checked)."""
    if args:
        raise OfficialCheckpointError("collections.OrderedDict called with arguments, which pickle.dump never writes")
    return OrderedDict()


# Globals met in the official files that become inert stand-ins: the official modules (training.*),
# timm's Mlp / PatchEmbed / Format, torch.nn layers, omegaconf configs (dataset_kwargs, attributes) and
# the type names their metadata refers to, torch.compile's OptimizedModule and dynamo contexts.
_STANDIN_PREFIXES = ("training.", "timm.", "torch.nn.modules.", "torch._dynamo.", "omegaconf.")
_STANDIN_NAMES = {"torch._TorchCompileInductorWrapper", "contextlib.nullcontext", "typing.Any",
                  "collections.defaultdict", "builtins.dict", "builtins.list", "builtins.tuple",
                  "builtins.int", "builtins.float", "builtins.str", "builtins.bool", "builtins.object"}
_TORCH_DTYPES = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}   # float32, ...

# The opcodes that pickle.dump writes (protocols 2 to 5) for what these files hold. The rest is refused by
# name: the text opcodes of protocols 0 and 1 (whose PUT and GET take any integer), persistent ids (only a
# storage record has one), extension codes, out-of-band buffers, and DUP / POP, which pickle.dump never writes.
_VALUE_OPCODES = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT", "SHORT_BINUNICODE",
                  "BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}
_OPCODES = _VALUE_OPCODES | {
    "PROTO", "FRAME", "STOP", "MARK", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_TUPLE", "TUPLE1", "TUPLE2",
    "TUPLE3", "TUPLE", "EMPTY_LIST", "APPEND", "APPENDS", "EMPTY_DICT", "SETITEM", "SETITEMS", "EMPTY_SET",
    "ADDITEMS", "FROZENSET", "GLOBAL", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "BINPUT",
    "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET", "BINPERSID"}
_CONTAINER_OPCODES = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "FROZENSET"}


# Storage records (pickle.dump writes each storage as a legacy torch.save of it: _Reader.load_storage).
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c   # torch.serialization.MAGIC_NUMBER, the first pickle of a storage record
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _Storage:
    """A storage read from the file (_Reader.load_storage): its bytes, on the CPU, and their dtype."""
    __slots__ = ("bytes", "dtype", "numel")

    def __init__(self, untyped, dtype):
        self.bytes, self.dtype, self.numel = untyped, dtype, untyped.nbytes() // dtype.itemsize


class _Reader:
    """Reads one file: what it may build, and the budgets it draws on. A file of `size` bytes gets at most
    MAX_STEPS steps of work, MAX_GLOBALS global names, `size` bytes of storages and `size` bytes of
    tensors (each tensor is a view of a storage, and a file could point many at the same bytes)."""

    def __init__(self, size):
        self.size, self.steps, self.storage_bytes, self.tensor_bytes, self.globals = size, 0, 0, 0, {}
        self.admitted = {   # global -> what it becomes
            "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct_persistent_obj,
            "torch.storage._load_from_bytes": self.load_storage,
            "torch._utils._rebuild_tensor_v2": self.rebuild_tensor,
            "torch._utils._rebuild_parameter": _rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
            "builtins.getattr": _getattr_on_standin,
            "collections.OrderedDict": _ordered_dict,
            "builtins.set": self.make_set,
            "builtins.frozenset": self.make_frozenset,
            "torch.Size": self.make_size,
            "torch.device": torch.device,
        }
        self.callables = list(self.admitted.values())

    def spend(self, steps):
        self.steps += steps
        if self.steps > MAX_STEPS:
            raise OfficialCheckpointError(f"the file asks for more than {MAX_STEPS:,} steps of unpickling (this "
                                          "loader's limit; an official snapshot needs about 100,000)")

    def run(self, f, end, what="the file", records=False):
        """Carry out the pickle at f's position (f ends at byte `end`) -> the object it builds. This is what
        pickle.load does, opcode by opcode, for the opcodes in _OPCODES, with this loader's checks; globals
        resolve through find_global (records=False) or to storage dtypes (records=True, the pickles inside
        a storage record, whose one persistent id is returned as it is)."""
        stack, marks, memo = [], [], []

        def pop_mark():                   # the items pushed since the last MARK
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            return items

        ops = pickletools.genops(f)
        while True:
            try:                          # genops parses one opcode and its argument, reading at most to `end`
                op, arg, pos = next(ops)
            except ValueError as e:
                if f.tell() >= end:       # a declared length, or the final STOP, lies past the end
                    raise OfficialCheckpointError(f"{what} ends early ({_text(e)}), as after an interrupted download: "
                                                  "compare its size with the published one") from None
                raise OfficialCheckpointError(f"{what} is not a pickle ({_text(e)})") from None
            self.spend(1)
            name = op.name
            if name not in _OPCODES or (name == "BINPERSID" and not records):
                raise OfficialCheckpointError(f"refused pickle opcode {name} at byte {pos} of {what}: pickle.dump "
                                              "does not write it for these files")
            if name in _VALUE_OPCODES:    # ints, floats, str and bytes, as genops parsed them
                stack.append(arg)
            elif name == "PROTO":
                if not 2 <= arg <= 5:
                    raise OfficialCheckpointError(f"{what} is a pickle of protocol {arg}, expected 2 to 5")
            elif name == "FRAME":         # framing only groups opcodes; a frame may not claim more than is left
                if arg > end - f.tell():
                    raise OfficialCheckpointError(f"{what} ends early (a frame of {arg} bytes at byte {pos}), as after "
                                                  "an interrupted download: compare its size with the published one")
            elif name == "STOP":
                return stack.pop()
            elif name == "MARK":
                marks.append(len(stack))
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
                n = ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3").index(name)
                if len(stack) < n:
                    raise IndexError("stack underflow")
                items = tuple(stack[len(stack) - n:])
                del stack[len(stack) - n:]
                stack.append(items)
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                stack.append({"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_SET": set}[name]())
            elif name in _CONTAINER_OPCODES:
                self.fill(name, stack, pop_mark)
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, qualname = arg.split(" ", 1)
                else:
                    qualname, module = stack.pop(), stack.pop()
                stack.append(self.find_storage_type(module, qualname) if records else
                             self.find_global(module, qualname))
            elif name == "REDUCE":
                args = stack.pop()
                stack[-1] = self.call(stack[-1], args, {})
            elif name in ("NEWOBJ", "NEWOBJ_EX"):
                kwargs = stack.pop() if name == "NEWOBJ_EX" else {}
                args, cls = stack.pop(), stack.pop()
                if not (isinstance(cls, type) and issubclass(cls, StandIn)):
                    raise OfficialCheckpointError(f"refused {name} of {_show(cls)}: only stand-ins are made so")
                stack.append(self.call(cls, args, kwargs))
            elif name == "BUILD":         # only a stand-in takes state: nothing of this loader can be changed
                state = stack.pop()
                if isinstance(stack[-1], StandIn):
                    stack[-1].__setstate__(state)
                elif type(stack[-1]) is not OrderedDict:   # state_dict()'s OrderedDict carries _metadata: dropped
                    raise OfficialCheckpointError(f"refused BUILD (setting the state) of {_show(stack[-1])}: only "
                                                  "the stand-ins of this loader take state from the file")
            elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                # pickle.dump numbers its memo slots 0, 1, 2, ... in order: the memo never outgrows the file.
                if name != "MEMOIZE" and arg != len(memo):
                    raise OfficialCheckpointError(f"refused memo index {arg} at byte {pos} of {what}: pickle.dump "
                                                  f"would write {len(memo)} there")
                memo.append(stack[-1])
            elif name in ("BINGET", "LONG_BINGET"):
                if arg >= len(memo):
                    raise OfficialCheckpointError(f"refused memo index {arg} at byte {pos} of {what}: only "
                                                  f"{len(memo)} are stored")
                stack.append(memo[arg])
            elif name == "BINPERSID":     # a storage record's persistent id is the record we want: it stays
                pass                      # on the stack as it is ('storage', dtype, key, location, numel, view)

    def fill(self, name, stack, pop_mark):
        """The opcodes that put items into the container on top of the stack (lists, dicts, sets, and the
        stand-ins that stand for them), or make a frozenset: each checked as run() checks every opcode."""
        if name in ("APPEND", "APPENDS"):
            items = [stack.pop()] if name == "APPEND" else pop_mark()
            if not isinstance(stack[-1], (list, StandIn)):
                raise OfficialCheckpointError(f"refused {name} to {_show(stack[-1])}: only lists and stand-ins "
                                              "are appended to")
            stack[-1].extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            if name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                items = [key, value]
            else:
                items = pop_mark()
            target = stack[-1]
            if type(target) not in (dict, OrderedDict) and not isinstance(target, StandIn):
                raise OfficialCheckpointError(f"refused {name} on {_show(target)}: only dicts and stand-ins "
                                              "take items")
            if not isinstance(target, StandIn):
                _check_keys(items[::2])
            for i in range(0, len(items) - 1, 2):
                target[items[i]] = items[i + 1]
        elif name == "ADDITEMS":
            items = pop_mark()
            if type(stack[-1]) is not set:
                raise OfficialCheckpointError(f"refused ADDITEMS to {_show(stack[-1])}: only sets take members")
            _check_keys(items)
            stack[-1].update(items)
        elif name == "FROZENSET":
            items = pop_mark()
            _check_keys(items)
            stack.append(frozenset(items))

    def find_global(self, module, name):
        """The object a global name of the file becomes: an admitted one, a dtype or a stand-in class."""
        if type(module) is not str or type(name) is not str or len(module) + len(name) >= MAX_NAME:
            raise OfficialCheckpointError(f"refused global {_show(module)} {_show(name)}: not a name of the "
                                          "official files")
        module = "builtins" if module == "__builtin__" else module   # pickle protocol 2 names Python 2's
        full = f"{module}.{name}"
        if full not in self.globals:
            if len(self.globals) >= MAX_GLOBALS:
                raise OfficialCheckpointError(f"the file names more than {MAX_GLOBALS} globals (this loader's "
                                              "limit; an official snapshot names about 30)")
            if full in self.admitted:
                self.globals[full] = self.admitted[full]
            elif module == "torch" and name in _TORCH_DTYPES:
                self.globals[full] = _TORCH_DTYPES[name]
            elif full in _STANDIN_NAMES or full.startswith(_STANDIN_PREFIXES):
                self.globals[full] = type(name.rsplit(".", 1)[-1], (StandIn,), {"global_name": full})
            else:
                raise OfficialCheckpointError(f"refused global {_text(full)}: it is not among the globals an official "
                                              "TVM snapshot holds, and this loader builds nothing else")
        return self.globals[full]

    def call(self, func, args, kwargs):
        """REDUCE and NEWOBJ: a call of an admitted function or a stand-in class, with few arguments (a call
        copies them)."""
        if not (isinstance(func, type) and issubclass(func, StandIn)) and not any(func is f for f in self.callables):
            raise OfficialCheckpointError(f"refused a call of {_show(func)}: only the admitted functions and the "
                                          "stand-ins are called")
        if type(args) is not tuple or type(kwargs) is not dict or len(args) + len(kwargs) > MAX_CALL_ARGS:
            raise OfficialCheckpointError(f"refused a call with {_show(args)} as its arguments: expected a tuple "
                                          f"of at most {MAX_CALL_ARGS}")
        return func(*args, **kwargs)

    def make_set(self, items=()):
        """builtins.set and frozenset (protocols 2 and 3 write set([...])): each member costs a step."""
        if type(items) not in (list, tuple):
            raise OfficialCheckpointError(f"builtins.set of {_show(items)}, expected a list")
        self.spend(len(items))
        _check_keys(items)
        return set(items)

    def make_frozenset(self, items=()):
        return frozenset(self.make_set(items))

    def make_size(self, sizes):
        """torch.Size(sizes), as in a tensor's metadata."""
        if type(sizes) not in (list, tuple) or len(sizes) > MAX_TENSOR_DIMS or not all(
                type(n) is int and 0 <= n < 2**62 for n in sizes):
            raise OfficialCheckpointError(f"torch.Size of {_show(sizes)}: expected at most {MAX_TENSOR_DIMS} sizes")
        return torch.Size(sizes)

    # Storages and tensors: every tensor is backed by bytes of the file.

    def find_storage_type(self, module, name):
        """The one global of a storage record: torch.FloatStorage and the like, which stand for a dtype."""
        if module != "torch" or name not in _STORAGE_DTYPES:
            raise OfficialCheckpointError(f"refused global {_show(module)}.{_show(name)} in a storage record: "
                                          "expected a storage type such as torch.FloatStorage")
        return _STORAGE_DTYPES[name]

    def load_storage(self, b):
        """In place of torch.storage._load_from_bytes, which is torch.load(weights_only=False) of the bytes:
        pickle.dump writes each storage as a legacy torch.save of it, that is five small pickles (magic
        number, protocol version, system info, the storage record ('storage', <dtype>Storage, key, location,
        numel, view) and the list of keys), then an int64 count and the elements. We read the pickles with
        run() and take the elements as they are, onto the CPU (storages saved from CUDA tensors carry the
        location 'cuda:N'), after checking that the record declares exactly the bytes that follow it:
        torch.load would reserve the declared size first."""
        if type(b) is not bytes:
            raise OfficialCheckpointError(f"torch.storage._load_from_bytes of {_show(b)}, expected bytes")
        f = io.BytesIO(b)
        magic, version, info, record, keys = (self.run(f, len(b), "a storage record", records=True) for _ in range(5))
        if not (magic == _LEGACY_MAGIC and version == 1001 and type(info) is dict and info.get("little_endian") is True
                and type(record) is tuple and len(record) == 6 and record[0] == "storage"
                and isinstance(record[1], torch.dtype) and type(record[2]) is str and type(record[3]) is str
                and type(record[4]) is int and record[5] is None and type(keys) is list and keys == [record[2]]):
            raise OfficialCheckpointError("a storage record not in the layout of a little-endian torch.save of "
                                          "one whole storage")
        dtype, numel = record[1], record[4]
        count = int.from_bytes(f.read(8), "little", signed=True)
        start = f.tell()
        if count != numel or numel * dtype.itemsize != len(b) - start:
            raise OfficialCheckpointError(f"a storage record declares {_show(numel)} elements of {dtype} and holds "
                                          f"{len(b) - start} bytes of them")
        self.storage_bytes += len(b) - start
        if self.storage_bytes > self.size:   # one record, memoised, may be rebuilt many times
            raise OfficialCheckpointError(f"the storages add up to more than the file's {self.size} bytes: the file "
                                          "rebuilds the same bytes more than once")
        untyped = torch.UntypedStorage.from_buffer(memoryview(b)[start:], dtype=torch.uint8) if numel else \
            torch.UntypedStorage(0)
        return _Storage(untyped, dtype)

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        """torch._utils._rebuild_tensor_v2, checked: the tensor lies inside its storage, with strides that
        address distinct elements (stride 0 would repeat one element as often as the file likes; torch
        would grow a storage too small for the tensor, with memory that is not from the file), and all
        tensors together hold at most the file's bytes. metadata (conj/neg bits) and hooks are dropped."""
        ints = lambda xs: type(xs) in (tuple, torch.Size) and len(xs) <= MAX_TENSOR_DIMS and all(
            type(x) is int and 0 <= x < 2**62 for x in xs)
        if not isinstance(storage, _Storage) or type(requires_grad) is not bool or backward_hooks:
            raise OfficialCheckpointError("a tensor record with a non-storage source, or with backward hooks")
        if not (ints(size) and ints(stride) and len(size) == len(stride) and ints((offset,))):
            raise OfficialCheckpointError(f"a tensor record with offset {_show(offset)}, size {_show(size)} and "
                                          f"stride {_show(stride)}: expected non-negative integers, one stride "
                                          "per size")
        numel = math.prod(size)
        if numel:
            if any(n > 1 and s == 0 for n, s in zip(size, stride)):
                raise OfficialCheckpointError(f"a tensor record of size {tuple(size)} with stride {tuple(stride)}: a "
                                              "zero stride repeats one element of the file")
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.numel:
                raise OfficialCheckpointError(f"a tensor record of size {tuple(size)} reaches element {last} of a "
                                              f"storage of {storage.numel}: the rest would not come from the file")
        self.tensor_bytes += numel * storage.dtype.itemsize
        if self.tensor_bytes > self.size:
            raise OfficialCheckpointError(f"the tensors add up to more than the file's {self.size} bytes: tensors "
                                          "that share bytes of the file are refused")
        tensor = torch.empty(0, dtype=storage.dtype).set_(storage.bytes, offset, tuple(size), tuple(stride))
        return tensor.requires_grad_(requires_grad)


def _read_pickle(path):
    """The object pickled in the file at path, built by _Reader (nothing of the file is executed). The file
    is mapped, not read: genops then reads each declared length from the mapping, which gives at most the
    bytes that are there, where a file object would first reserve the declared size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise OfficialCheckpointError("the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return _Reader(size).run(m, size)
    except FileNotFoundError:
        raise OfficialCheckpointError("no such file") from None
    except OfficialCheckpointError:
        raise
    except Exception as e:               # a file that breaks an admitted call (wrong arguments, ...)
        text = " ".join(str(e)[:1000].split())
        raise OfficialCheckpointError(f"not read as an official TVM snapshot ({type(e).__name__}: "
                                      f"{_text(text)})") from None


# ------------------------------------------------------------------------------------------------
# The network in the stand-ins: each module visited once
# ------------------------------------------------------------------------------------------------

def _module_state(obj):
    """The __dict__ that a stand-in of a torch module recorded (BUILD may give (state, slotstate))."""
    state = obj.state if isinstance(obj, StandIn) else None
    if isinstance(state, tuple) and len(state) == 2:
        state = state[0]
    return state if isinstance(state, dict) else {}


def _entries(state, kind):
    """[(name, value)] of state[kind] (_parameters, _buffers or _modules): a dict of short names without dots."""
    entries = state.get(kind)
    if entries is None:
        return []
    if not isinstance(entries, dict):
        raise OfficialCheckpointError(f"a module's {kind} is {_show(entries)}, expected a dict")
    for name in entries:
        if type(name) is not str or not 0 < len(name) <= MAX_NAME or "." in name:
            raise OfficialCheckpointError(f"a module's {kind} holds the name {_show(name)}: expected a name "
                                          f"of at most {MAX_NAME} characters without dots")
    return list(entries.items())


def _children(obj):
    """{name: child} of a stand-in module. torch.compile's OptimizedModule holds the real module as
    _orig_mod: in _modules (older torch), in its __dict__, or (torch >= 2.6, whose __reduce__ is
    (OptimizedModule, (module, dynamo_ctx))) as its first argument."""
    state = _module_state(obj)
    children = {k: v for k, v in _entries(state, "_modules") if v is not None}
    if obj.global_name.endswith(".OptimizedModule") and "_orig_mod" not in children:
        orig = state.get("_orig_mod", obj.args[0] if obj.args else None)
        if orig is not None:
            children["_orig_mod"] = orig
    return children


def _module_tree(root):
    """[(prefix, module)] of the module tree under root, breadth first: each module exactly once, so the
    walk is linear in the file. The official network is a tree (every layer is built on its own), so a
    module reached twice, shared or in a cycle, is refused, as are trees deeper than MAX_DEPTH or larger
    than MAX_MODULES."""
    tree, seen = [("", root)], {id(root): "the network itself"}
    for prefix, module in tree:          # the list grows while we go: breadth first
        for name, child in _children(module).items():
            path = prefix + name
            if not isinstance(child, StandIn):
                raise OfficialCheckpointError(f"module {_show(path)} is {_show(child)}, not a module")
            if id(child) in seen:
                raise OfficialCheckpointError(f"the module tree reaches one module as {_show(seen[id(child)])} and as "
                                              f"{_show(path)}: the official network is a tree, and a shared or "
                                              "cyclic module is refused")
            if path.count(".") >= MAX_DEPTH:
                raise OfficialCheckpointError(f"the module tree is deeper than {MAX_DEPTH} levels at {_show(path)} "
                                              "(this loader's limit; the official network has 7)")
            if len(tree) >= MAX_MODULES:
                raise OfficialCheckpointError(f"the module tree holds more than {MAX_MODULES} modules (this "
                                              "loader's limit; the official XL/2 network has about 600)")
            seen[id(child)] = path
            tree.append((path + ".", child))
    return tree


def _state_dict(tree):
    """{name: tensor} of a module tree (_module_tree), named as nn.Module.state_dict() names them."""
    out = {}
    for prefix, module in tree:
        state = _module_state(module)
        skip = state.get("_non_persistent_buffers_set") or set()
        if type(skip) not in (set, frozenset):
            raise OfficialCheckpointError(f"a module's _non_persistent_buffers_set is {_show(skip)}, expected a set")
        for kind in ("_parameters", "_buffers"):
            for k, v in _entries(state, kind):
                if v is None or (kind == "_buffers" and k in skip):
                    continue
                if not isinstance(v, torch.Tensor):
                    raise OfficialCheckpointError(f"{_show(prefix + k)} holds {_show(v)}, not a tensor")
                if prefix + k in out:
                    raise OfficialCheckpointError(f"{_show(prefix + k)} is both a parameter and a buffer")
                out[prefix + k] = v
    return out


def _find_attribute(tree, name):
    """The first value of attribute `name` in the module tree, breadth first (the official wrapper holds
    img_resolution, img_channels, label_dim, do_scale_param)."""
    return next((_module_state(m)[name] for _, m in tree if name in _module_state(m)), None)


def _int_attribute(tree, name):
    """An integer attribute of the network (None if absent): a bool, a tensor or anything else is refused."""
    value = _find_attribute(tree, name)
    if value is not None and type(value) is not int:
        raise OfficialCheckpointError(f"{name} is {_show(value)}, expected an integer")
    return value


# ------------------------------------------------------------------------------------------------
# Official names -> tvm.DiT, and the network the weights declare
# ------------------------------------------------------------------------------------------------

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
            raise OfficialCheckpointError(f"unexpected weight {_show(key)} outside the wrapped DiT (model.*)")
        if ours in out:
            raise OfficialCheckpointError(f"two weights are named {_show(ours)} once renamed (one of them "
                                          f"{_show(key)})")
        out[ours] = value
    table = out.get("y_embedder.weight")
    if table is not None:
        if table.dim() != 2 or table.shape[0] < label_dim + 1:
            raise OfficialCheckpointError(f"the label table has shape {tuple(table.shape)}, expected at least "
                                          f"label_dim + 1 = {label_dim + 1} rows (label_dim classes and the null "
                                          "class)")
        out["y_embedder.weight"] = table[:label_dim + 1]
    return out


def dit_kwargs_from_state_dict(sd):
    """tvm.DiT's constructor arguments read off the shapes of its state dict, within DIT_LIMITS."""
    def shape(key, dims):
        if key not in sd:
            raise OfficialCheckpointError(f"no weight {key!r} after renaming: not a DiT of the official layout")
        if sd[key].dim() != dims or 0 in sd[key].shape:
            raise OfficialCheckpointError(f"{key} has shape {tuple(sd[key].shape)}, expected {dims} dimensions, "
                                          "none of size 0")
        return sd[key].shape

    _, tokens, hidden = shape("pos_embed", 3)
    _, in_channels, _, patch = shape("x_embedder.weight", 4)
    head_dim, = shape("blocks.0.attn.q_norm.weight", 1)
    grid = math.isqrt(tokens)
    if grid * grid != tokens or hidden % head_dim:
        raise OfficialCheckpointError(f"pos_embed has {tokens} positions of size {hidden} and the heads have size "
                                      f"{head_dim}: expected a square grid and a head size that divides {hidden}")
    kwargs = dict(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                  depth=sum(1 for k in sd if k.startswith("blocks.") and k.endswith(".adaLN.weight")),
                  num_heads=hidden // head_dim, mlp_ratio=shape("blocks.0.mlp.0.weight", 2)[0] / hidden,
                  num_classes=shape("y_embedder.weight", 2)[0] - 1)
    for k, (lo, hi) in DIT_LIMITS.items():
        if not lo <= kwargs[k] <= hi:
            raise OfficialCheckpointError(f"the weights declare a DiT with {k} {kwargs[k]}, outside this loader's "
                                          f"limits {lo}..{hi}")
    return kwargs


def _dit_of(sd, kwargs):
    """tvm.DiT(**kwargs) holding the tensors of sd (no copy), after checking that they are exactly its
    weights: names, shapes, one floating dtype, and at most MAX_PARAMS of them."""
    try:
        with torch.device("meta"):       # no initialisation: every tensor comes from the file
            net = tvm.DiT(**kwargs)
    except Exception as e:               # tvm.DiT's own checks (hidden size and heads, ...)
        raise OfficialCheckpointError(f"tvm.DiT({kwargs}) cannot be built ({type(e).__name__})") from None
    params = sum(p.numel() for p in net.parameters())
    if params > MAX_PARAMS:
        raise OfficialCheckpointError(f"the weights declare a DiT of {params:,} parameters, more than this "
                                      f"loader's limit of {MAX_PARAMS:,}")
    expected = {k: v.shape for k, v in net.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise OfficialCheckpointError(f"the weights do not fit tvm.DiT({kwargs}): " + "; ".join(
            f"{what} {_names(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                        ("of another shape", wrong)) if keys))
    dtypes = sorted({str(v.dtype) for v in sd.values()})
    if len(dtypes) != 1 or not next(iter(sd.values())).is_floating_point():
        raise OfficialCheckpointError(f"the weights are of dtypes {', '.join(dtypes)}: expected one floating-point "
                                      "dtype")
    net.load_state_dict(sd, strict=True, assign=True)
    return net


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
    paper's FID of the released file of that name (None, with known=False, for other names). A file that
    is refused raises OfficialCheckpointError: '<path>: <the cause, in one sentence>'."""
    try:
        return _load_official(path, device)
    except OfficialCheckpointError as e:
        raise OfficialCheckpointError(f"{path}: {e}; nothing in the file was executed") from None


def _load_official(path, device):
    name = os.path.basename(path)
    data = _read_pickle(path)
    key = next((k for k in ("ema", "net") if isinstance(data, dict) and k in data), None)
    if key is None:
        found = f"the keys {_names(list(data))}" if isinstance(data, dict) else _show(data)
        raise OfficialCheckpointError(f"expected a dict with the network under 'ema' or 'net', found {found}")
    root = data[key]
    if not isinstance(root, StandIn):
        raise OfficialCheckpointError(f"data[{key!r}] is {_show(root)}, not a pickled network (a state dict saved "
                                      "with pickle is not an official snapshot)")
    tree = _module_tree(root)
    raw = _state_dict(tree)
    if not raw:
        raise OfficialCheckpointError(f"data[{key!r}] holds no weights")

    label_dim = _int_attribute(tree, "label_dim")
    rows = next((v.shape[0] for k, v in raw.items() if k.endswith("y_embedder.embedding_table.weight") and v.dim()),
                None)
    if label_dim is None and rows is not None:
        label_dim = rows - 1
    lo, hi = DIT_LIMITS["num_classes"]
    if label_dim is None or not lo <= label_dim <= hi:
        raise OfficialCheckpointError(f"label_dim is {_show(label_dim)}, expected an integer in {lo}..{hi}")
    sd = official_state_dict(raw, label_dim)
    kwargs = dit_kwargs_from_state_dict(sd)
    # A cross-check of the wrapper's attributes against the weights' shapes. img_resolution is taken as the
    # network's input side (latents) or as the pixel side (8x), whichever the official wrapper records.
    side, channels = _int_attribute(tree, "img_resolution"), _int_attribute(tree, "img_channels")
    S, C = kwargs["input_size"], kwargs["in_channels"]
    if (channels is not None and channels != C) or (side is not None and side not in (S, 8 * S)):
        raise OfficialCheckpointError(f"the wrapper says {_show(channels)} channels at resolution {_show(side)}, the "
                                      f"weights take {C} x {S} x {S} inputs: not a consistent snapshot")

    release = RELEASED.get(name)
    scale_param = _find_attribute(tree, "do_scale_param")
    if not isinstance(scale_param, bool):
        if release is None:
            raise OfficialCheckpointError(f"do_scale_param is {_show(scale_param)}, not true or false, and {name} "
                                          f"is not one of the released files {sorted(RELEASED)}")
        scale_param = release["scale_param"]

    net = _dit_of(sd, kwargs).to(device).eval().requires_grad_(False)
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
