"""The config schema: every shipped config validates; bad input fails naming the field."""
from pathlib import Path

import pytest

from selfplay.config import ConfigError, apply_overrides, load_config, parse_override

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.loop.iterations >= 1


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"debug.yaml", "single_gpu.yaml", "cluster_qwen3_8b.yaml"}


def test_overrides_keep_types():
    cfg = load_config(None, ["learner.lr=3e-4", "loop.iterations=5", "engine.backend=vllm", "metrics.exporters=[console]"])
    assert cfg.learner.lr == pytest.approx(3e-4)
    assert cfg.loop.iterations == 5 and cfg.engine.backend == "vllm"
    assert cfg.metrics.exporters == ["console"]


@pytest.mark.parametrize("text,want", [("on", "on"), ("off", "off"), ("auto", "auto"), ("yes", "on"), ("'on'", "on")])
def test_on_off_switches_survive_yaml_booleans(tmp_path, text, want):
    """YAML 1.1 turns a bare on/off/yes into a boolean; the switch still means what was written."""
    assert load_config(None, [f"learner.gradient_checkpointing={text}"]).learner.gradient_checkpointing == want
    f = tmp_path / "c.yaml"
    f.write_text(f"learner:\n  bf16: {text}\n")
    assert load_config(f).learner.bf16 == want


def test_nested_override_creates_section():
    data = apply_overrides({}, ["learner.lora.r=4"])
    assert data == {"learner": {"lora": {"r": 4}}}


@pytest.mark.parametrize(
    "override, field",
    [
        ("learner.eps_high=-1", "learner.eps_high"),
        ("learner.lr=fast", "learner.lr"),
        ("engine.backend=tgi", "engine.backend"),
        ("executor.max_turnz=3", "executor.max_turnz"),
        ("verifier.band_low=0.9", "verifier"),
        ("sandbox.memory_mb=12", "sandbox.memory_mb"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_unknown_field_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learner:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learner.learning_rate: unknown field"):
        load_config(p)


@pytest.mark.parametrize("text", ["- a\n- b\n", "learner: [\n"])
def test_malformed_file(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError):
        load_config(p)


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/cfg.yaml")


def test_unknown_keys_suggest_the_closest_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["learner.lrr=1e-5", "lerner.lr=1", "learner.lora.rr=4", "learner.zzzzzz=1"])
    text = str(e.value)
    assert "learner.lrr: unknown field (did you mean learner.lr?)" in text
    assert "lerner: unknown field (did you mean learner?)" in text
    assert "learner.lora.rr: unknown field (did you mean learner.lora.r?)" in text
    assert "learner.zzzzzz: unknown field\n" in text + "\n"  # nothing close: no guess


def test_config_directory_is_refused_with_a_file_to_use(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match=r"is a directory: pass a YAML config file, e.g. .*a.yaml"):
        load_config(tmp_path)


@pytest.mark.parametrize("k,low,high,says", [
    (4, 0.25, 0.75, ["p_hat = 1/4 (all 4 answers differ)", "ties (p_hat = 1/2", "above 0.5"]),
    (10, 0.3, 0.8, ["ties (p_hat = 3/10, 2/5, 1/2", "above 0.5"]),
    (3, 0.3, 0.7, ["p_hat = 1/3 (all 3 answers differ)", "above 0.333"]),
    (4, 0.55, 0.8, []),
    (10, 0.51, 1.0, []),
])
def test_band_warns_when_it_admits_one_over_k_or_ties(k, low, high, says):
    from selfplay.config import band_warnings

    cfg = load_config(None, [f"executor.samples_per_task={k}", f"verifier.band_low={low}",
                             f"verifier.band_high={high}"])
    warnings = band_warnings(cfg)
    assert len(warnings) == (1 if says else 0)
    for s in says:
        assert s in warnings[0]
    if k == 3:
        assert "ties" not in warnings[0]  # with k = 3 a tie is 1-1-1, which is p_hat = 1/3 itself
