"""``tank serve --certfile PATH [--keyfile PATH]`` (issue 12, part 1): ``wss://`` and the API over
HTTPS on one port; a missing or bad certificate is one line on stderr and exit status 2."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from cli_support import run, start_serve
from websockets.asyncio.client import connect

from tank_cli import _config, _main


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pem(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    return certfile, keyfile


def _resolve(argv: list[str]) -> _config.Settings:
    return _config.resolve(_main.build_parser().parse_args(["serve", *argv]), {})


def test_certfile_and_keyfile_make_a_server_context(pem: tuple[Path, Path]) -> None:
    certfile, keyfile = pem
    settings = _resolve(["--certfile", str(certfile), "--keyfile", str(keyfile)])
    assert isinstance(settings.ssl, ssl.SSLContext)
    assert _resolve([]).ssl is None


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--certfile", "/nonexistent/cert.pem"], "cannot read /nonexistent/cert.pem: no such file"),
        (["--keyfile", "key.pem"], "--keyfile needs --certfile"),
    ],
)
def test_a_missing_certificate_is_one_line(argv: list[str], needle: str) -> None:
    with pytest.raises(_config.UsageError, match=needle):
        _resolve(argv)


def test_a_bad_certificate_is_one_line(tmp_path: Path, pem: tuple[Path, Path]) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(_config.UsageError, match="cannot use the certificate in"):
        _resolve(["--certfile", str(junk)])
    certfile, _keyfile = pem
    with pytest.raises(_config.UsageError, match="cannot use the certificate in"):
        _resolve(["--certfile", str(certfile)])  # no key in it, and none given


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_tank_serve_with_a_certificate_serves_wss(
    backend: str, ca: trustme.CA, pem: tuple[Path, Path]
) -> None:
    certfile, keyfile = pem
    context = ssl.create_default_context()
    ca.configure_trust(context)

    async def main() -> None:
        served = await start_serve("--backend", backend, "--certfile", str(certfile),
                                   "--keyfile", str(keyfile))
        assert served.url.startswith("wss://127.0.0.1:")
        async with connect(served.url + "?user_id=tls", ssl=context, proxy=None) as ws:
            assert await ws.recv() == "Hello, tls! Welcome to WebSocket server."
        code, _out, err = await served.stop()
        assert code == 0, err
        assert "status page https://127.0.0.1:" in err

    run(main())
