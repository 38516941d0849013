"""The value codec and message framing shared by the sandbox harness and the sandboxed child
(standard library only: the child imports it before it locks itself down).

Values cross the process boundary as tagged JSON (`encode_value` / `decode_value`), so the harness
never unpickles anything that untrusted code produced. Harness-to-child messages (requests,
call arguments, answers to a checker) are length-prefixed pickles written by the harness only.
"""

from __future__ import annotations

import pickle

# ---------------------------------------------------------------------------------------------
# Value codec: plain JSON for None/bool/str/float/list/small int, tagged objects for the rest.

_TAG = "$"
_MAX_DEPTH = 100
_MAX_NODES = 2_000_000
_EXACT_INT_BOUND = 2**53


class OpaqueValue:
    """A value the codec cannot carry (a generator, a custom object, ...): equal to nothing."""

    def __init__(self, type_name: str, text: str):
        self.type_name = type_name
        self.text = text

    def __eq__(self, other):
        return self is other

    def __hash__(self):
        return id(self)

    def __repr__(self):
        return f"<opaque {self.type_name}: {self.text}>"


class _Budget:
    def __init__(self):
        self.nodes = 0


def _opaque(value, note=None) -> dict:
    try:
        text = note or repr(value)[:200]
    except BaseException:  # a hostile __repr__ may raise anything
        text = "<unrepresentable>"
    return {_TAG: "opaque", "type": type(value).__qualname__, "v": text}


def _encode(value, depth: int, budget: _Budget):
    budget.nodes += 1
    if budget.nodes > _MAX_NODES or depth > _MAX_DEPTH:
        raise OverflowError
    kind = type(value)
    if value is None or isinstance(value, (bool, str, float)):
        return str(value) if isinstance(value, str) and kind is not str else value
    if isinstance(value, int):
        value = int(value)
        return value if abs(value) < _EXACT_INT_BOUND else {_TAG: "int", "v": hex(value)}
    if isinstance(value, complex):
        return {_TAG: "complex", "v": [value.real, value.imag]}
    if isinstance(value, (bytes, bytearray)):
        return {_TAG: "bytes", "v": bytes(value).hex()}
    if isinstance(value, list):
        return [_encode(item, depth + 1, budget) for item in value]
    if isinstance(value, tuple):
        return {_TAG: "tuple", "v": [_encode(item, depth + 1, budget) for item in value]}
    if isinstance(value, (set, frozenset)):
        tag = "frozenset" if isinstance(value, frozenset) else "set"
        return {_TAG: tag, "v": [_encode(item, depth + 1, budget) for item in value]}
    if isinstance(value, dict):
        pairs = [
            [_encode(key, depth + 1, budget), _encode(item, depth + 1, budget)]
            for key, item in value.items()
        ]
        return {_TAG: "dict", "v": pairs}
    if kind.__module__ == "numpy" and hasattr(value, "tolist"):
        payload = _encode(value.tolist(), depth + 1, budget)
        if hasattr(value, "shape") and value.shape != ():
            return {_TAG: "ndarray", "v": payload, "dtype": str(value.dtype)}
        return payload
    return _opaque(value)


def encode_value(value):
    """Encodes a Python value as JSON-compatible data that `decode_value` turns back into an
    equal plain value (tuples, sets, dicts with any hashable keys, complex, big ints, numpy)."""
    try:
        return _encode(value, 0, _Budget())
    except (OverflowError, RecursionError):
        return _opaque(value, "<too large or too deep to encode>")
    except BaseException as error:  # hostile containers may raise anything
        return _opaque(value, f"<encoding failed: {type(error).__name__}>")


_ARRAY_KINDS = "biufcUS"  # bool, integers, floats, complex, strings: plain scalar dtypes only


def _array_dtype(text):
    """The dtype named by an event, if it is a plain scalar one (a subarray dtype such as
    "(20000000,)i8" would make a tiny event allocate gigabytes)."""
    import numpy  # only the harness decodes arrays

    dtype = numpy.dtype(str(text))
    if dtype.kind not in _ARRAY_KINDS or dtype.shape != () or dtype.itemsize > 64:
        raise ValueError(f"unsupported array dtype {text!r}")
    return dtype


def _decode_tagged(data: dict, depth: int):
    tag = data.get(_TAG)
    payload = data.get("v")
    if tag == "int":
        return int(payload, 16)
    if tag == "complex":
        return complex(payload[0], payload[1])
    if tag == "bytes":
        return bytes.fromhex(payload)
    if tag == "tuple":
        return tuple(_decode(item, depth + 1) for item in payload)
    if tag == "set":
        return {_decode(item, depth + 1) for item in payload}
    if tag == "frozenset":
        return frozenset(_decode(item, depth + 1) for item in payload)
    if tag == "dict":
        return {_decode(key, depth + 1): _decode(item, depth + 1) for key, item in payload}
    if tag == "ndarray":
        import numpy

        return numpy.array(_decode(payload, depth + 1), dtype=_array_dtype(data.get("dtype")))
    return OpaqueValue(str(data.get("type")), str(payload))


def _decode(data, depth: int):
    if depth > _MAX_DEPTH:
        raise OverflowError
    if isinstance(data, list):
        return [_decode(item, depth + 1) for item in data]
    if isinstance(data, dict):
        try:
            return _decode_tagged(data, depth)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            return OpaqueValue("malformed", str(data)[:200])
    return data


def decode_value(data):
    """Inverse of `encode_value`; unknown or malformed tags, values nested deeper than
    `encode_value` writes them and arrays of other than plain scalar dtypes become an
    `OpaqueValue`."""
    try:
        return _decode(data, 0)
    except (OverflowError, RecursionError):
        return OpaqueValue("malformed", "<nested too deeply>")


def frame(message: dict) -> bytes:
    """A harness-to-child message: 8-byte big-endian length, then the pickle."""
    payload = pickle.dumps(message)
    return len(payload).to_bytes(8, "big") + payload


def read_message(stream) -> dict | None:
    """Reads one `frame`d message from a binary stream (None at end of stream)."""
    header = stream.read(8)
    if len(header) < 8:
        return None
    return pickle.loads(stream.read(int.from_bytes(header, "big")))
