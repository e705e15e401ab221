"""Server settings: defaults < config file < TENSORLINE_* environment < CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tensorline.server import Settings

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TENSORLINE_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = Settings.load()
    assert settings.port == 50051
    assert settings.max_message_bytes == 256 * MiB
    assert settings.max_tensor_bytes >= 64 * MiB
    assert settings.runtime is None
    assert settings.node_modules == []


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "tensorline.yaml"
    config.write_text("port: 1000\nmax_tensor_bytes: 10\nwarm_instances: 3\nlog_level: DEBUG\n")
    from_file = Settings.load(config)
    assert (from_file.port, from_file.max_tensor_bytes, from_file.warm_instances) == (1000, 10, 3)

    monkeypatch.setenv("TENSORLINE_PORT", "2000")
    monkeypatch.setenv("TENSORLINE_MAX_TENSOR_BYTES", "20")
    from_env = Settings.load(config)
    assert (from_env.port, from_env.max_tensor_bytes, from_env.warm_instances) == (2000, 20, 3)

    flags = Settings.load(config, port=3000, max_tensor_bytes=None, log_level=None)
    assert (flags.port, flags.max_tensor_bytes, flags.log_level) == (3000, 20, "DEBUG")


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"plan_cache_size": 7, "node_modules": ["a.b", "c"]}))
    monkeypatch.setenv("TENSORLINE_CONFIG", str(config))
    settings = Settings.load()
    assert settings.plan_cache_size == 7
    assert settings.node_modules == ["a.b", "c"]


def test_environment_lists_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORLINE_NODE_MODULES", " acme.nodes, more.nodes ,")
    monkeypatch.setenv("TENSORLINE_UNTRUSTED_MODULES", "evil.nodes")
    monkeypatch.setenv("TENSORLINE_LOAD_ENTRY_POINTS", "false")
    monkeypatch.setenv("TENSORLINE_RUNTIME", " SandBox ")
    settings = Settings.load()
    assert settings.node_modules == ["acme.nodes", "more.nodes"]
    assert settings.untrusted_modules == ["evil.nodes"]
    assert settings.load_entry_points is False
    assert settings.runtime == "sandbox"
    assert Settings.load(node_modules=["x"]).node_modules == ["x"]


def test_model_roots_are_the_pipelines_dir_then_the_model_dirs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TENSORLINE_MODEL_DIRS", f" {tmp_path / 'a'}, {tmp_path / 'b'} ,")
    monkeypatch.setenv("TENSORLINE_PIPELINES_DIR", str(tmp_path / "pipelines"))
    settings = Settings.load()
    assert settings.model_dirs == [tmp_path / "a", tmp_path / "b"]
    assert settings.model_roots == (str(tmp_path / "pipelines"), str(tmp_path / "a"),
                                    str(tmp_path / "b"))
    monkeypatch.delenv("TENSORLINE_PIPELINES_DIR")
    monkeypatch.setenv("TENSORLINE_MODEL_DIRS", "")
    assert Settings.load().model_roots == ()


@pytest.mark.parametrize(("value", "runtime"), [
    ("cpython", "inprocess"), ("In_Process", "inprocess"), ("rust_python", "sandbox"),
    ("CPYTHON_WASM", "sandbox"), ("sandboxed", "sandbox"), ("auto", "auto"),
])
def test_runtime_accepts_the_hint_aliases(monkeypatch: pytest.MonkeyPatch, value: str,
                                          runtime: str) -> None:
    """docs/runtime-selection.md and docs/migration.md: TENSORLINE_RUNTIME takes the same
    spellings as runtime_hint, the reference design's runtime names included."""
    monkeypatch.setenv("TENSORLINE_RUNTIME", value)
    assert Settings.load().runtime == runtime


@pytest.mark.parametrize(("name", "value"), [
    ("TENSORLINE_PORT", "70000"),
    ("TENSORLINE_MAX_MESSAGE_BYTES", "0"),
    ("TENSORLINE_RUNTIME", "quantum"),
])
def test_invalid_environment_values_are_errors(monkeypatch: pytest.MonkeyPatch, name: str,
                                               value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings.load()


def test_unknown_settings_in_a_file_are_errors(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("prot: 1\n")
    with pytest.raises(ValidationError, match="prot"):
        Settings.load(config)
    config.write_text("- 1\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        Settings.load(config)
