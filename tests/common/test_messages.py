"""The typed messages: what each side builds, the other parses back; what breaks the protocol has a code."""

import pytest

from mobillm.common import messages, wire
from mobillm.common.taps import TapSpec
from mobillm.common.messages import (BitPlan, Credit, Hello, ModelMeta, ProtocolError, Welcome,
                                     side_input_names)

HELLO = Hello("ab" * 32, "facebook/opt-125m", "sst2", "class", 2, "tokens",
              (TapSpec(2, 64, "nf4", 32), TapSpec(4, 64, "int8", 32)), "phone", None, 2, 96)


def test_hello_round_trip_and_default_run_name():
    again = Hello.from_meta(wire.decode_frame(messages.frame(HELLO)).meta)
    assert again == HELLO
    assert again.run_name == "sst2-" + "ab" * 6 and again.formats() == ["nf4", "int8"]


@pytest.mark.parametrize("bits", ["auto", "auto:utility", "auto:paper"])
def test_adaptive_bits_of_every_rule_allow_any_format(bits):
    assert Hello.from_meta({**HELLO.to_meta(), "bits": bits}).formats() is None


@pytest.mark.parametrize("change, code", [
    ({"protocol": 2}, "version"),
    ({"taps": []}, "bad_hello"),
    ({"num_labels": True}, "bad_hello"),
    ({"run": "no spaces"}, "bad_hello"),
    ({"bits": "int8,int8,int8"}, "bad_hello"),
    ({"bits": "autopaper"}, "bad_hello"),
])
def test_bad_hello_has_a_code(change, code):
    with pytest.raises(ProtocolError) as err:
        Hello.from_meta({**HELLO.to_meta(), **change})
    assert err.value.code == code


@pytest.mark.parametrize("cls, meta, code", [
    (Welcome, {"session": "s1", "run": "r", "resume": {"samples_done": 0}}, "bad_welcome"),
    (Welcome, {"session": "s1", "run": "r", "credits": 8, "resume": {"samples_done": -1}}, "bad_welcome"),
    (Credit, {"credits": 1, "acked_seq": "3", "samples_done": 0}, "bad_credit"),
    (BitPlan, {"importance": ["x"], "step": 1}, "bad_bitplan"),
])
def test_bad_server_messages_have_a_code(cls, meta, code):
    with pytest.raises(ProtocolError) as err:
        cls.from_meta(meta)
    assert err.value.code == code


def test_welcome_defaults_for_optional_fields():
    got = Welcome.from_meta({"session": "s1", "run": "r", "credits": 4, "resume": {"samples_done": 8}})
    assert (got.credits, got.samples_done, got.stop_streaming, got.federated) == (4, 8, False, None)


def test_model_meta_names_the_side_network_contract():
    meta = ModelMeta({"pooling": "last"}, 3, "sst2", "class", 2, "r", [], {}).to_meta()
    assert meta["inputs"] == side_input_names(3) == ["tap0", "tap1", "tap2", "mask"]
    assert ModelMeta.check(meta) is meta
    with pytest.raises(ProtocolError):
        ModelMeta.check({**meta, "inputs": ["x0", "mask"]})


# Names become folders on the server: the whole string must match (re.fullmatch), so a trailing
# newline, a path, an empty or overlong name and unicode lookalikes are all refused.
BAD_NAMES = ["evil\n", "evil\r\n", "../x", "a/b", "", ".hidden", "x" * 129, "ｒun", "run\u200b", "rün", "tab\there"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("field", ["run", "device_id", "task"])
def test_names_are_checked_whole(field, name):
    assert not messages.is_name(name)
    if field == "run" and name == "":  # an empty run means "not given": the server names the run
        assert Hello.from_meta({**HELLO.to_meta(), "run": ""}).run is None
        return
    with pytest.raises(ProtocolError) as err:
        Hello.from_meta({**HELLO.to_meta(), field: name})
    assert err.value.code == "bad_hello" and field.split("_")[0] in err.value.message


@pytest.mark.parametrize("name", ["r", "run-1", "a.b_c-d", "x" * 128, "0"])
def test_good_names_pass(name):
    assert messages.is_name(name)
    assert Hello.from_meta({**HELLO.to_meta(), "run": name, "device_id": name}).run == name


@pytest.mark.parametrize("model_id", ["evil\n", "", " opt", "x" * 513, "a\x00b", 7])
def test_bad_model_id_is_refused(model_id):
    with pytest.raises(ProtocolError) as err:
        Hello.from_meta({**HELLO.to_meta(), "model_id": model_id})
    assert err.value.code == "bad_hello" and "model_id" in err.value.message


@pytest.mark.parametrize("model_id", ["facebook/opt-125m", "/data/ckpt/my model", "google/gemma-3-270m"])
def test_model_ids_from_real_engines_pass(model_id):
    assert Hello.from_meta({**HELLO.to_meta(), "model_id": model_id}).model_id == model_id


def test_sha_is_checked_whole():
    with pytest.raises(ProtocolError):
        Hello.from_meta({**HELLO.to_meta(), "manifest_sha256": "ab" * 32 + "\n"})
