"""The config schema: every key's type and range are declared once (vesselfast/schema.py ``option``) and
checked before any stage runs; what relates keys (steps <= diffusion.T, tile and crop against the
networks) is checked after, with the key that is wrong named first. All of it runs without training."""
import dataclasses

import pytest

from vesselfast.errors import UserError
from vesselfast.pipeline.config import PRESETS, RETIRED_KEYS, RunConfig, dump, from_dict, resolve
from vesselfast.schema import field_types

# Keys whose type is all the schema declares: free text checked by validate() (device, vessel_prior) or
# by the data loaders (folders).
TYPE_ONLY = {"device", "data.target", "data.target_test", "segmenter.vessel_prior"}


def leaf_fields(cls=RunConfig, where=""):
    """(dotted key, field, declared type) of every key of the schema."""
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else types[f.name]):
            yield from leaf_fields(types[f.name], f"{where}{f.name}.")
        else:
            yield f"{where}{f.name}", f, types[f.name]


LEAVES = list(leaf_fields())


def test_every_key_is_declared():
    """A key without a declared range is either a switch (bool) or named in TYPE_ONLY; a new key must
    say what it allows."""
    undeclared = [name for name, f, tp in LEAVES if not f.metadata and tp is not bool and name not in TYPE_ONLY]
    assert not undeclared, undeclared
    assert len(LEAVES) >= 50


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_are_valid_and_round_trip(preset):
    cfg = resolve(preset)
    assert from_dict(dataclasses.asdict(cfg)) == cfg
    assert dump(from_dict(dataclasses.asdict(cfg))) == dump(cfg)


def _bad_values(name, f, tp):
    """Values that break the declaration of one key, each with the text its message must hold."""
    m = f.metadata
    if "choices" in m:
        yield "nonsense", f"{name}='nonsense': use "
    if m.get("nonempty"):
        yield "[]", f"{name}=[]: give a non-empty list"
    is_list = str(tp).startswith(("typing.List", "typing.Sequence", "List", "Sequence"))
    for bound, off in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if bound in m:
            v = m[bound] + off
            if isinstance(m[bound], int) and not isinstance(m[bound], bool) and "float" not in str(tp):
                v = int(v)
            yield (f"[{v}]", f"{name}=[") if is_list else (str(v), f"{name}=")
    if "float" in str(tp) and not is_list:
        yield "nan", f"{name}=nan must be a finite number"


CASES = [(name, value, text) for name, f, tp in LEAVES for value, text in _bad_values(name, f, tp)]


@pytest.mark.parametrize("name,value,text", CASES, ids=[f"{n}={v}" for n, v, _ in CASES])
def test_every_declared_range_is_enforced(name, value, text):
    with pytest.raises(UserError) as exc:
        resolve("tiny", sets=[f"{name}={value}"])
    assert str(exc.value).startswith(text), str(exc.value)


@pytest.mark.parametrize("item,message", [
    # the cases found by hand (issue 19): each names its own key
    ("generator.lr=-1", "generator.lr=-1.0 must be > 0"),
    ("generator.lr=nan", "generator.lr=nan must be a finite number > 0"),
    ("generator.lr=.inf", "generator.lr=inf must be a finite number > 0"),
    ("segmenter.channels=[]", "segmenter.channels=[]: give a non-empty list of channel counts >= 1, e.g. [16, 32, 64]"),
    ("segmenter.threshold=2", "segmenter.threshold=2.0 must lie in (0, 1)"),
    ("generator.ema_decay=2", "generator.ema_decay=2.0 must lie in [0, 1)"),
    ("synthesis.eta=-1", "synthesis.eta=-1.0 must lie in [0, 1]"),
    ("segmenter.tile=7", "segmenter.tile=7 must be >= 16"),
    ("diffusion.T=0", "diffusion.T=0 must be >= 10 (paper: 1000)"),
    ("data.crop=0", "data.crop=0 must be >= 16"),
    # keys related to each other
    ("diffusion.T=15", "diffusion.T=15 is too small for the linear schedule"),
    ("segmenter.tile=66", "segmenter.tile=66 must be a multiple of 4"),
    ("segmenter.stride=100", "segmenter.stride=100 must be in [1, segmenter.tile=64]"),
    ("diffusion.ddim_steps=200", "diffusion.ddim_steps=200 must be in [2, diffusion.T=100]"),
    ("generator.attention_levels=[2]", "generator.attention_levels=[2]: level 2 does not exist"),
    ("segmenter.channels=[8,8,8,8,8,8,8]", "data.crop=32 is smaller than the segmenter's 7 levels need (64 px)"),
    # types
    ("rounds=1.5", "config key 'rounds' expects int, got 1.5"),
    ("segmenter.channels=[8, x]", "config key 'segmenter.channels' expects a list of int, got [8, 'x']"),
    ("data.target=null", "config key 'data.target' expects str, got None"),
    ("segmenter.calibrate=source", "config key 'segmenter.calibrate' was renamed segmenter.vessel_prior"),
])
def test_found_cases(item, message):
    with pytest.raises(UserError) as exc:
        resolve("tiny", sets=[item])
    assert str(exc.value).startswith(message), str(exc.value)


def test_diffusion_T_is_checked_before_the_keys_bounded_by_it():
    with pytest.raises(UserError, match=r"^diffusion\.T=0 "):
        resolve("tiny", sets=["diffusion.T=0", "diffusion.ddim_steps=50", "synthesis.noise_steps=50"])


def test_retired_keys_keep_their_refusal():
    for key, why in RETIRED_KEYS.items():
        with pytest.raises(UserError) as exc:
            resolve("tiny", sets=[f"{key}=1"])
        assert str(exc.value) == f"config key {key!r} {why}"


def test_values_in_range_pass_and_keep_their_types():
    cfg = resolve("tiny", sets=["generator.lr=3e-4", "segmenter.threshold=0.4", "synthesis.eta=1",
                                "data.source_scale=null", "segmenter.vessel_prior=0.07", "data.clahe=no"])
    assert cfg.generator.lr == 3e-4 and cfg.synthesis.eta == 1.0 and isinstance(cfg.synthesis.eta, float)
    assert cfg.data.source_scale is None and cfg.segmenter.vessel_prior == "0.07" and cfg.data.clahe is False
