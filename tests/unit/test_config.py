from pathlib import Path

import pytest

from server.config import ConfigError, load_settings


def test_defaults_match_documented_file() -> None:
    """config/returnfeed.toml lists every setting with its default."""
    import tomllib

    from server.config import DEFAULT_CONFIG_FILE, Settings

    documented = tomllib.loads(DEFAULT_CONFIG_FILE.read_text())
    defaults = Settings().model_dump(mode="json")
    assert documented == defaults


def test_env_overrides_file_and_flags_override_env(tmp_path: Path) -> None:
    cfg = tmp_path / "rf.toml"
    cfg.write_text('[http]\nport = 9000\n[log]\nlevel = "debug"\n')
    s = load_settings(cfg, environ={})
    assert s.http.port == 9000 and s.log.level == "DEBUG"
    s = load_settings(cfg, environ={"RETURNFEED_HTTP__PORT": "9100"})
    assert s.http.port == 9100
    s = load_settings(cfg, {"http.port": 9200}, environ={"RETURNFEED_HTTP__PORT": "9100"})
    assert s.http.port == 9200
    s = load_settings(cfg, {"http.port": None}, environ={})
    assert s.http.port == 9000


def test_database_url_env_and_lists(tmp_path: Path) -> None:
    s = load_settings(None, environ={"DATABASE_URL": "postgresql://x@h/db",
                                     "RETURNFEED_HTTP__CORS_ORIGINS": "https://a.example, https://b.example"})
    assert s.database.url == "postgresql://x@h/db"
    assert s.http.cors_origins == ["https://a.example", "https://b.example"]
    s = load_settings(None, environ={"RETURNFEED_HTTP__CORS_ORIGINS": '["https://c.example"]'})
    assert s.http.cors_origins == ["https://c.example"]


@pytest.mark.parametrize(
    "text, env, needle",
    [
        ("[http]\nport = 70000\n", {}, "http.port"),
        ("[srt]\npbkeylen = 20\n", {}, "srt.pbkeylen"),
        ("[http]\nnope = 1\n", {}, "http.nope"),
        ("", {"RETURNFEED_SRT__LATENCY_MS": "fast"}, "srt.latency_ms"),
        ("[log]\nlevel = 'loud'\n", {}, "log.level"),
        ("not toml = = 1", {}, "not valid TOML"),
    ],
)
def test_invalid_config_names_the_setting(tmp_path: Path, text: str, env: dict, needle: str) -> None:
    cfg = tmp_path / "rf.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg, environ=env)
    assert needle in str(exc.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", environ={})
