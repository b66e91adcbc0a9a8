"""kt quantize: experts quantized once, saved with a checked header, reloaded; stale files refused."""
import json

import pytest
import torch

import kt_core
from kt_core.cli import main
from kt_core.errors import KtError
from kt_core.models.synthetic import synthesize

SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, max_position_embeddings=256)
IDS = [5, 9, 30, 2, 77, 41, 8]


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m"
    synthesize(path, preset="tiny-qwen3-moe", layers=2, shape=SHAPE, sample_tokens=32)
    return path


def load(path, *ov):
    return kt_core.Engine.from_pretrained(path, overrides=["model.dtype=float32", *ov])


def test_quantize_once_then_reload_gives_the_same_model(model):
    fresh = load(model, "quant=int4", "quant.group_size=32").logits(IDS)
    assert main(["quantize", f"model.path={model}", "quant=int4", "quant.group_size=32"]) == 0
    saved = model / "kt-experts-int4-g32-sym.ktq"
    assert saved.is_file() and not list(model.glob("*.tmp")) and not list(model.glob("*.part"))
    engine = load(model, "quant=int4", "quant.group_size=32")
    assert engine.model.prequant is not None and engine.model.prequant.path == saved
    assert torch.equal(engine.logits(IDS), fresh)
    # another group size does not pick this file up
    assert load(model, "quant=int4", "quant.group_size=64").model.prequant is None


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "fp8"])
def test_every_quantized_format_round_trips(model, tmp_path, fmt):
    out = tmp_path / f"{fmt}.ktq"
    g = "quant.group_size=32"
    assert main(["quantize", f"model.path={model}", f"quant={fmt}", g, f"out={out}"]) == 0
    want = load(model, f"quant={fmt}", g).logits(IDS)
    got = load(model, f"quant={fmt}", g, f"quant.prepacked={out}")
    assert got.model.prequant is not None and torch.equal(got.logits(IDS), want)


def test_stale_or_mismatched_files_are_refused(model, tmp_path):
    out = tmp_path / "e.ktq"
    assert main(["quantize", f"model.path={model}", "quant=int4", "quant.group_size=32", f"out={out}"]) == 0
    with pytest.raises(KtError, match="holds int4-g32-sym experts, the config asks for int4-g64-sym"):
        load(model, "quant=int4", "quant.group_size=64", f"quant.prepacked={out}")
    with pytest.raises(KtError, match="does not exist"):
        load(model, "quant=int4", f"quant.prepacked={tmp_path / 'nope.ktq'}")
    cut = tmp_path / "cut.ktq"
    cut.write_bytes(out.read_bytes()[:-100])
    with pytest.raises(KtError, match="truncated"):
        load(model, "quant=int4", "quant.group_size=32", f"quant.prepacked={cut}")
    junk = tmp_path / "junk.ktq"
    junk.write_bytes(b"not a model")
    with pytest.raises(KtError, match="not a kt-core quantized experts file"):
        load(model, "quant=int4", "quant.group_size=32", f"quant.prepacked={junk}")
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5  # the checkpoint changed after quantizing
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KtError, match="stale: it was made from a different checkpoint"):
        load(model, "quant=int4", "quant.group_size=32", f"quant.prepacked={out}")


def test_quantize_needs_a_quantized_format_and_a_fitting_group(model, capsys):
    assert main(["quantize", f"model.path={model}"]) == 2
    assert "needs a quantized expert format" in capsys.readouterr().err
    assert main(["quantize", f"model.path={model}", "quant=fp8", "quant.group_size=128"]) == 2
    assert "quant.group_size=128 must divide the input dim 64" in capsys.readouterr().err
    assert not list(model.glob("*.ktq*")), "a failed run leaves no file behind"


# ---------------------------------------------------------------- every header field is checked
# A small .ktq written by kt quantize's writer from tiny synthetic experts; the header is then
# edited field by field. Before these checks, in_features and the shapes in the header sized
# the tensors handed to the native kernels (reads past the data), and a wrong type raised
# TypeError / KeyError / AttributeError instead of saying the file is damaged.
import copy  # noqa: E402
import struct  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from kt_core.weights import prequant  # noqa: E402
from kt_core.weights.quant import ExpertWeights, quantize  # noqa: E402

TINY = dict(H=64, I=32, ids=[5, 1, 6], layers=(0, 2))


def tiny_spec(H=TINY["H"], I=TINY["I"], n_experts=8, bias=False, moe_layers=TINY["layers"]):
    """What PrequantFile reads of a ModelSpec."""
    return SimpleNamespace(hidden_size=H, num_layers=4, is_moe=lambda i: i in moe_layers,
                           moe=SimpleNamespace(num_experts=n_experts, intermediate=I, expert_bias=bias))


def tiny_experts(fmt="int4", symmetric=False, bias=False, H=TINY["H"], I=TINY["I"], ids=TINY["ids"], seed=0):
    g = torch.Generator().manual_seed(seed)
    E = len(ids)

    def w(*shape):
        return quantize(torch.randn(*shape, generator=g) * 0.05, fmt, group_size=32, symmetric=symmetric)
    kw = {}
    if bias:
        kw = {k: torch.randn(E, n, generator=g) for k, n in (("gate_bias", I), ("up_bias", I), ("down_bias", H))}
    return ExpertWeights(torch.tensor(ids), w(E, I, H), w(E, I, H), w(E, H, I), **kw)


def tiny_ktq(path, fmt="int4", symmetric=False, bias=False, **kw):
    """A valid file (kt quantize's Writer) and the arguments that open it."""
    header = prequant._expected("fingerprint-1", "TinyMoe", fmt, 32, symmetric)
    writer = prequant.Writer(path, header)
    for layer in TINY["layers"]:
        writer.add_layer(layer, tiny_experts(fmt, symmetric, bias, seed=layer, **kw))
    writer.close()
    return dict(fingerprint="fingerprint-1", arch="TinyMoe", experts=fmt, group_size=32, symmetric=symmetric)


def open_ktq(path, args, spec=None):
    return prequant.PrequantFile(path, **args, **({} if spec is None else {"spec": spec}))


def split_ktq(raw: bytes) -> tuple:
    """(header dict, payload bytes) of a .ktq file's bytes."""
    head_len = struct.unpack("<I", raw[4:8])[0]
    base = 8 + head_len + (-(8 + head_len)) % prequant.ALIGN
    return json.loads(raw[8:8 + head_len]), raw[base:]


def join_ktq(header, payload: bytes) -> bytes:
    """A file of this header (any JSON) and payload, laid out as the Writer lays it out."""
    head = json.dumps(header).encode()
    pad = (-(8 + len(head))) % prequant.ALIGN
    return prequant.MAGIC + struct.pack("<I", len(head)) + head + b"\0" * pad + payload


def edit_header(path, edit) -> None:
    header, payload = split_ktq(path.read_bytes())
    header = copy.deepcopy(header)
    edit(header)
    path.write_bytes(join_ktq(header, payload))


def refused(path, args, spec=None, match=""):
    """The one-line KtError that names the file and says to re-run kt quantize."""
    with pytest.raises(KtError) as got:
        open_ktq(path, args, spec)
    msg = str(got.value)
    assert str(path) in msg and "\n" not in msg, msg
    assert "kt quantize" in msg, msg
    assert "unexpectedly" not in msg, f"a check is missing: {msg}"
    if match:
        import re
        assert re.search(match, msg), msg
    return msg


@pytest.mark.parametrize("fmt,symmetric,bias", [("int4", False, False), ("int4", True, True), ("int8", True, False),
                                                 ("w8a8", True, True), ("fp8", True, False)])
def test_a_valid_tiny_file_loads_and_runs(tmp_path, fmt, symmetric, bias):
    path = tmp_path / "t.ktq"
    args = tiny_ktq(path, fmt, symmetric, bias)
    f = open_ktq(path, args, tiny_spec(bias=bias))
    ex = f.experts(2, [6, 5], torch.device("cpu"))
    want = tiny_experts(fmt, symmetric, bias, seed=2)
    assert torch.equal(ex.gate.qdata, want.gate.qdata[[2, 0]]) and ex.down.in_features == TINY["I"]
    from kt_backends.cpu import native
    if native.available():
        packed = native.pack(ex)
        out = native.moe_forward(packed, torch.randn(2, TINY["H"]), torch.tensor([[6, 5], [5, 1]]), torch.rand(2, 2))
        assert out.shape == (2, TINY["H"])


def set_(keys, value):
    def edit(h):
        node = h
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


G = ("layers", "0", "gate")


@pytest.mark.parametrize("edit,match", [
    (set_(G + ("in_features",), 128), r"gate.in_features is 128|gate.qdata is uint8 .* expected"),
    (set_(("layers", "0", "down", "in_features"), 64), r"down.in_features is 64, the layer's sizes need 32"),
    (set_(G + ("group_size",), 48), r"group_size 48 does not divide in_features 64"),
    (set_(G + ("group_size",), 16), r"gate.scales is float32 \[3, 32, 2\], expected float32 \[3, 32, 4\]"),
    (set_(G + ("qdata", "shape"), [3, 32, 64]), r"gate.qdata has nbytes 3072, but uint8 \[3, 32, 64\] takes 6144"),
    (set_(G + ("qdata", "nbytes"), 10 ** 12), r"nbytes"),
    (set_(G + ("qdata", "offset"), -64), r"offset -64"),
    (set_(G + ("qdata", "offset"), 65), r"offset 65"),
    (set_(G + ("qdata", "offset"), 10 ** 9), r"truncated"),
    (set_(G + ("qdata", "offset"), "0"), r"offset '0'"),
    (set_(G + ("qdata", "dtype"), "float64"), r"dtype 'float64', not one of uint8"),
    (set_(G + ("qdata", "dtype"), "int8"), r"gate.qdata is int8 .* expected uint8"),
    (set_(G + ("scales", "shape"), [3, 32, True]), r"shape"),
    (set_(G + ("zeros",), None), r"gate has no zeros, which int4-g32-asym experts need"),
    (set_(("layers", "0", "up", "scales"), None), r"up.scales is None, not a tensor entry"),
    (set_(("layers", "0", "gate_bias"), {"dtype": "float32", "shape": [3, 32], "offset": 0, "nbytes": 384}),
     r"has expert biases"),
    (set_(("layers", "0", "expert_ids"), [5, 1]), r"gate.qdata is uint8 \[3, 32, 32\], expected uint8 \[2, 32, 32\]"),
    (set_(("layers", "0", "expert_ids"), [5, 5, 6]), r"lists an expert twice"),
    (set_(("layers", "0", "expert_ids"), [5, -1, 6]), r"expert_ids"),
    (set_(("layers", "0", "expert_ids"), "5,1,6"), r"expert_ids"),
    (set_(("layers", "x"), {}), r"layer key 'x' is not a layer number"),
    (set_(("layers",), []), r"'layers' is \[\]"),
    (set_(("version",), True), r"stale: it has format version True"),
    (set_(("quant",), ["int4-g32-asym"]), r"stale: it holds \['int4-g32-asym'\] experts"),
    (lambda h: h["layers"]["0"]["down"].pop("zeros"), r"down has no zeros field"),
    (lambda h: h["layers"]["2"].pop("up_bias"), r"layer 2 has no up_bias field"),
    (lambda h: h["layers"].update({"3": h["layers"]["0"]}), r"layer 3 is not an MoE layer of this model"),
])
def test_every_header_field_is_checked(tmp_path, edit, match):
    """Checked without the model spec (what the file says of itself) unless the check is one
    against the model (biases, MoE layers)."""
    path = tmp_path / "t.ktq"
    args = tiny_ktq(path)
    open_ktq(path, args)  # valid before the edit
    edit_header(path, edit)
    against_model = "biases" in match or "MoE layer" in match
    refused(path, args, tiny_spec() if against_model else None, match)


def test_the_header_is_checked_against_the_model(tmp_path):
    path = tmp_path / "t.ktq"
    args = tiny_ktq(path)
    refused(path, args, tiny_spec(H=128), r"hidden size 64 and width 32, this model's are 128 and 32")
    refused(path, args, tiny_spec(I=64), r"hidden size 64 and width 32, this model's are 64 and 64")
    refused(path, args, tiny_spec(n_experts=6), r"lists expert 6, this model has 6")
    refused(path, args, tiny_spec(bias=True), r"lacks expert biases")
    refused(path, args, tiny_spec(moe_layers=(0,)), r"layer 2 is not an MoE layer")
    open_ktq(path, args, tiny_spec()).close()


def test_a_damaged_header_or_file_is_one_clear_error(tmp_path):
    path = tmp_path / "t.ktq"
    args = tiny_ktq(path)
    raw = path.read_bytes()
    header, payload = split_ktq(raw)
    for bad, match in [
        (join_ktq([header], payload), "not a JSON object"),
        (join_ktq("text", payload), "not a JSON object"),
        (raw[:4] + struct.pack("<I", 2**32 - 1) + raw[8:], r"truncated: its header needs 4294967303 bytes"),
        (raw[:4] + struct.pack("<I", 3) + raw[8:], "damaged header"),
        (raw[:8] + b"[" * 100000 + raw[8:], "damaged header"),  # deeper than json can nest
        (raw[:20] + b"\xff\xfe" + raw[22:], "damaged header"),
        (raw[:len(raw) - 1], "truncated"),
        (b"", "not a kt-core quantized experts file"),
    ]:
        path.write_bytes(bad)
        refused(path, args, None, match)


def test_a_damaged_file_from_kt_quantize_is_refused_by_the_engine(model, tmp_path):
    """The engine's path: a .ktq whose header lies about in_features is refused when the model
    loads, not handed to the kernels."""
    out = tmp_path / "e.ktq"
    assert main(["quantize", f"model.path={model}", "quant=int4", "quant.group_size=32", f"out={out}"]) == 0
    edit_header(out, lambda h: h["layers"][min(h["layers"])]["down"].update(in_features=128))
    with pytest.raises(KtError, match=rf"{out} is damaged: layer \d+ down.in_features is 128.*kt quantize"):
        load(model, "quant=int4", "quant.group_size=32", f"quant.prepacked={out}")
