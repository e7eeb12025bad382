"""A config file's argument (`--config=FILE.py:ARG`): variants, FIELD=VALUE items and their errors."""

import pathlib

import ml_collections
import pytest

from kdjax import train
from kdjax.config import apply_arg, args

ROOT = pathlib.Path(__file__).resolve().parent.parent


def base():
    return ml_collections.ConfigDict(dict(seed=0, lr=0.1, data=dict(resolution=16, name="digits"), widths=(4, 8)))


def test_items_apply_in_order_with_types_kept():
    calls = []
    config = apply_arg(base(), "tiny,seed=3,data.resolution=32,widths=(8,16),data.name=mnist,res=8",
                       {"tiny": lambda c: calls.append(c.seed)}, {"res": "data.resolution"})
    assert calls == [0]  # the variant ran before seed=3
    assert (config.seed, config.data.resolution, config.widths, config.data.name) == (3, 8, (8, 16), "mnist")
    assert apply_arg(base(), "lr=1").lr == 1.0 and isinstance(apply_arg(base(), "lr=1").lr, float)


@pytest.mark.parametrize("arg, message", [
    ("huge", "unknown variant 'huge'"),
    ("sed=1", "no field 'sed'"),
    ("data.size=1", "no field 'data.size'"),
    ("seed='a'", "seed='a'"),
])
def test_bad_items_name_what_is_valid(arg, message):
    with pytest.raises(ValueError, match=message) as e:
        apply_arg(base(), arg, {"tiny": lambda c: None}, where="configs/x.py")
    assert "configs/x.py" in str(e.value) and "['tiny']" in str(e.value)


def test_split_respects_brackets_and_quotes():
    assert args.split_items("a=(1,2), b=[3,4],c='x,y',,tiny") == ["a=(1,2)", "b=[3,4]", "c='x,y'", "tiny"]


def test_config_files_take_variants_and_fields():
    config = train.load_config(f"{ROOT}/configs/classifier_kd.py:tiny,seed=5,kd.alpha=0.5")
    assert (config.seed, config.kd.alpha, config.data.resolution) == (5, 0.5, 8)
    with pytest.raises(ValueError, match="configs/classifier_kd.py: bad argument item 'tiniest'"):
        train.load_config(f"{ROOT}/configs/classifier_kd.py:tiniest")


def test_an_alias_may_set_several_fields():
    config = train.load_config(f"{ROOT}/configs/stylegan_to_dcgan.py:tiny,adv=0.5,kl=0.25")
    assert (config.distill.weights.adv.value, config.distill.weights.adv.end_value) == (0.5, 0.5)
    assert (config.distill.weights.kl.value, config.distill.weights.kl.end_value) == (0.25, 0.25)
