"""The one validation mechanism (common/schema.py): rules declared on fields, JSON in and out, migration."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from mobillm.common import schema
from mobillm.common.manifest import Manifest, ManifestError
from mobillm.common.messages import Hello, ProtocolError
from mobillm.common.schema import SchemaError, rule
from mobillm.common.taps import TapSpec
from mobillm.trainer.config import RunConfig

OLD_RUNS = Path(__file__).parents[1] / "trainer" / "data" / "main_runs"


@dataclass(frozen=True)
class Inner:
    width: int = rule(min=1, max=8)


@dataclass(frozen=True)
class Outer:
    name: str = rule(choices=("a", "b"))
    groups: list[int] = rule(key="blocks", min=0)
    inners: tuple[Inner, ...] = rule(check=lambda v: None if v else "must not be empty")
    pair: tuple[float, float] = (0.5, 1.0)
    note: str | None = rule(None, omit_none=True)

    def cross_check(self) -> None:
        if sum(self.groups) != len(self.inners):
            raise SchemaError("groups must add up to the inners")


GOOD = {"name": "a", "blocks": [1, 0], "inners": [{"width": 3}], "pair": [0.1, 0.2]}


def test_load_and_dump_round_trip_with_an_on_disk_key():
    outer = schema.load(Outer, GOOD)
    assert outer == Outer("a", [1, 0], (Inner(3),), (0.1, 0.2))
    assert schema.dump(outer) == GOOD  # `note` is None: left out


@pytest.mark.parametrize("change, says", [
    ({"name": "c"}, "name must be one of ['a', 'b'], got 'c'"),
    ({"blocks": [1, -1]}, "blocks must be >= 0, got -1"),
    ({"blocks": "1,0"}, "blocks must be list[int], got '1,0'"),
    ({"inners": [{"width": 9}]}, "inners[0].width must be in 1..8, got 9"),
    ({"inners": [{"width": True}]}, "inners[0].width must be int, got True"),
    ({"inners": []}, "inners must not be empty"),
    ({"blocks": [2]}, "groups must add up to the inners"),
    ({"pair": [1.0]}, "pair must be tuple[float, float]"),
])
def test_each_rule_names_the_field(change, says):
    with pytest.raises(SchemaError, match=says.replace("[", r"\[").replace("]", r"\]")):
        schema.load(Outer, {**GOOD, **change})


def test_missing_and_unknown_keys():
    with pytest.raises(SchemaError, match="inners is missing"):
        schema.load(Outer, {k: v for k, v in GOOD.items() if k != "inners"})
    assert schema.load(Outer, {**GOOD, "from_the_future": 1}) == schema.load(Outer, GOOD)


def test_migrate_runs_the_reader_of_the_documents_version():
    readers = {1: lambda d: {"format_version": 2, "new": d["old"]}, 2: lambda d: d}
    assert schema.migrate({"format_version": 1, "old": 7}, "thing", "format_version", readers) == \
        {"format_version": 2, "new": 7}
    with pytest.raises(SchemaError, match="thing format version 3 is not supported .this mobillm reads 1, 2."):
        schema.migrate({"format_version": 3}, "thing", "format_version", readers)


def test_one_tap_spec_from_manifest_to_hello_to_run_config(tiny_engine):
    manifest = Manifest.load(tiny_engine, verify=False)
    hello = Hello("ab" * 32, manifest.model_id, "sst2", "class", 2, "tokens", tuple(manifest.taps), "phone", None,
                  1, 8)
    received = Hello.from_meta(hello.to_meta())
    assert [t.to_meta() for t in received.taps] == [t.to_meta() for t in manifest.taps]
    assert all(isinstance(t, TapSpec) and t.codes_output is None for t in received.taps)
    dumped = [schema.dump(t) for t in received.taps]  # as a run's config.json holds them
    assert dumped == [{"layer": t.layer, "hidden": t.hidden, "fmt": t.fmt, "block_size": t.block_size}
                      for t in manifest.taps]


@pytest.mark.parametrize("tap, says", [({"hidden": 0}, "taps[0].hidden must be in 1..65536"),
                                       ({"block_size": 70000}, "taps[0].block_size must be in 0..65535"),
                                       ({"fmt": "int3"}, "taps[0].fmt must be one of")])
def test_the_hello_checks_taps_by_the_same_rules(tap, says):
    meta = Hello("ab" * 32, "m", "sst2", "class", 2, "tokens", (TapSpec(2, 64, "nf4", 32),), "phone", None, 1,
                 8).to_meta()
    meta["taps"][0].update(tap)
    with pytest.raises(ProtocolError, match=says.replace("[", r"\[").replace("]", r"\]")) as err:
        Hello.from_meta(meta)
    assert err.value.code == "bad_hello"


def test_a_new_manifest_is_written_as_read(tiny_engine):
    """New writes are byte-identical to what the exporter wrote (layer_groups is "blocks" on disk)."""
    text = (tiny_engine / "manifest.json").read_text()
    assert json.dumps(Manifest.load(tiny_engine).to_dict(), indent=2) + "\n" == text
    assert '"blocks"' in text and "layer_groups" not in text


def test_a_manifest_from_before_tokens_migrates_to_the_opt_rule(tiny_engine):
    data = json.loads((tiny_engine / "manifest.json").read_text())
    data["tokens"] = {}  # engines made before the family's token rules were recorded
    manifest = Manifest.from_dict(data)
    assert manifest.tokens == manifest.token_rules == {"bos_id": data["config"]["bos_token_id"],
                                                       "bos_each_segment": True, "eos_id": None}


def test_an_unknown_manifest_version_is_refused(tiny_engine):
    data = json.loads((tiny_engine / "manifest.json").read_text())
    with pytest.raises(ManifestError, match="manifest format version 2 is not supported .this mobillm reads 1."):
        Manifest.from_dict({**data, "format_version": 2})


@pytest.mark.parametrize("kind, run", [("single", "restarted"), ("cache", "cached")])
def test_an_old_run_config_keeps_every_value(kind, run, tmp_path):
    """A run folder written before this code: its config loads (taps as TapSpecs) and saves with every old
    key and value as it was (fields added since join with their defaults, as they did before)."""
    old = json.loads((OLD_RUNS / kind / run / "config.json").read_text())
    config = RunConfig.load(OLD_RUNS / kind / run)
    assert all(isinstance(t, TapSpec) for t in config.taps)
    saved = json.loads(config.save(tmp_path).read_text())
    for section in ("side", "optim"):
        assert {k: saved[section][k] for k in old[section]} == old.pop(section)
    assert {k: saved[k] for k in old} == old
