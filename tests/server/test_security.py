"""TLS, mutual TLS, bearer tokens and the loopback rule, end to end: certificates made here (a CA of
our own, a server certificate for 127.0.0.1 and localhost, client certificates), a real engine on the
bundled tiny model, real servers on 127.0.0.1 (port 0), the real clients and the `jalora` command.

Failures are asserted by their status codes, which the server or the TLS handshake sends at once; the
only time limit is HANG, a guard against a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from checkpoints import DEFAULT_MODEL_DIR
from jalora import LLM
from jalora.client import TLS, AsyncClient, Client, ServerError
from jalora.errors import InvalidRequestError
from server import cli
from server.app import ServerThread, server_options
from server.config import ServerConfig, is_loopback
from tests.waiting import HANG

ADAPTERS = DEFAULT_MODEL_DIR / "adapters"  # the bundled tiny model's judges
TOKEN, ADMIN_TOKEN = "user-token-0123456789", "admin-token-9876543210"
UNAUTHENTICATED, PERMISSION_DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


# ---- certificates --------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, usage=None, sans=None):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, *, cert=None, key=None) -> str:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """PEM files: `ca` signs `server` (SANs 127.0.0.1 and localhost) and `client`; `rogue_ca` signs
    `rogue_client`, a client certificate the server must not trust. Also the two token files."""
    d = tmp_path_factory.mktemp("pki")
    files = {}
    for ca in ("ca", "rogue_ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        files[ca] = _write(d / f"{ca}.pem", cert=_certificate(ca, ca_key, ca, ca_key, ca=True))
        leaves = [("client" if ca == "ca" else "rogue_client", ExtendedKeyUsageOID.CLIENT_AUTH, None)]
        if ca == "ca":
            sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            leaves.append(("server", ExtendedKeyUsageOID.SERVER_AUTH, sans))
        for leaf, usage, sans in leaves:
            key = ec.generate_private_key(ec.SECP256R1())
            files[leaf] = _write(d / f"{leaf}.pem", cert=_certificate(leaf, key, ca, ca_key, usage=usage, sans=sans))
            files[f"{leaf}_key"] = _write(d / f"{leaf}.key", key=key)
    for name, token in (("token", TOKEN), ("admin_token", ADMIN_TOKEN)):
        (d / name).write_text(token + "\n")
        files[name] = str(d / name)
    return files


# ---- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    """One engine for every server of this module, which serve it one at a time (no warm-up: the one
    generation below compiles its step)."""
    return LLM(str(DEFAULT_MODEL_DIR), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128,
               max_loras=2, warmup=False).engine  # fmt: skip


@contextlib.contextmanager
def _serving(engine, **config):
    with ServerThread(engine, ServerConfig(port=0, **config)) as server:
        yield server.target


@pytest.fixture(scope="module")
def tls_token_server(engine, pki):
    """TLS, a token for every call, an admin token for adapter changes, the judges' folder as root."""
    with _serving(engine, tls_cert=pki["server"], tls_key=pki["server_key"], auth_token_file=pki["token"],
                  admin_token_file=pki["admin_token"], adapter_roots=[str(ADAPTERS)]) as target:  # fmt: skip
        yield target


def _code(call) -> grpc.StatusCode:
    with pytest.raises(ServerError) as err:
        call()
    return err.value.code


# ---- TLS -----------------------------------------------------------------------------------------


def test_tls_client_with_the_ca_works_and_a_plaintext_client_fails(tls_token_server, pki):
    with Client(tls_token_server, tls=TLS(ca=pki["ca"]), token=TOKEN, timeout=HANG) as client:
        assert client.health(timeout=HANG) == "SERVING"
        assert client.server_info().max_loras == 2
        result = client.generate("hello", max_tokens=2, temperature=0.0, ignore_eos=True)
        assert len(result.token_ids) == 2 and result.finish_reason == "length"
    with Client(tls_token_server, token=TOKEN, timeout=HANG) as plaintext:
        assert _code(lambda: plaintext.health(timeout=HANG)) == grpc.StatusCode.UNAVAILABLE
    # The server's certificate is signed by our CA, which gRPC's bundled roots do not hold.
    with Client(tls_token_server, tls=True, token=TOKEN, timeout=HANG) as untrusting:
        assert _code(lambda: untrusting.health(timeout=HANG)) == grpc.StatusCode.UNAVAILABLE


def test_tls_by_host_name_and_pem_bytes(tls_token_server, pki):
    """The certificate names localhost too; TLS takes PEM contents as well as paths."""
    port = tls_token_server.rsplit(":", 1)[1]
    ca = Path(pki["ca"]).read_bytes()
    with Client(f"localhost:{port}", tls=TLS(ca=ca), token=TOKEN, timeout=HANG) as client:
        assert client.list_adapters() == []


@pytest.fixture(scope="module")
def mtls_server(engine, pki):
    with _serving(engine, tls_cert=pki["server"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]) as target:
        yield target


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(mtls_server, pki):
    signed = TLS(ca=pki["ca"], cert=pki["client"], key=pki["client_key"])
    with Client(mtls_server, tls=signed, timeout=HANG) as client:
        assert client.health(timeout=HANG) == "SERVING" and client.list_adapters() == []
    rogue = TLS(ca=pki["ca"], cert=pki["rogue_client"], key=pki["rogue_client_key"])
    for tls in (TLS(ca=pki["ca"]), rogue):
        with Client(mtls_server, tls=tls, timeout=HANG) as client:
            assert _code(lambda c=client: c.list_adapters(timeout=HANG)) == grpc.StatusCode.UNAVAILABLE


# ---- tokens --------------------------------------------------------------------------------------


def test_missing_or_wrong_token_is_unauthenticated(tls_token_server, pki):
    tls = TLS(ca=pki["ca"])
    with Client(tls_token_server, tls=tls, timeout=HANG) as none, \
            Client(tls_token_server, tls=tls, token="wrong", timeout=HANG) as wrong:  # fmt: skip
        for client in (none, wrong):
            assert _code(client.list_adapters) == UNAUTHENTICATED
            assert _code(client.server_info) == UNAUTHENTICATED
            assert _code(lambda c=client: c.generate("hello", max_tokens=1)) == UNAUTHENTICATED  # a stream
        with pytest.raises(ServerError) as err:
            none.tokenize("hello")
        assert "needs a token in `authorization: Bearer <token>` metadata" in err.value.details
        with pytest.raises(ServerError) as err:
            wrong.tokenize("hello")
        assert err.value.details == "invalid bearer token"

    async def run():
        async with AsyncClient(tls_token_server, tls=tls, token="wrong", timeout=HANG) as client:
            with pytest.raises(ServerError) as err:
                await client.list_adapters()
            assert err.value.code == UNAUTHENTICATED
        async with AsyncClient(tls_token_server, tls=tls, token=TOKEN, timeout=HANG) as client:
            assert await client.list_adapters() == []
            assert await client.health(timeout=HANG) == "SERVING"

    asyncio.run(run())


def test_health_needs_no_token(tls_token_server, pki):
    with Client(tls_token_server, tls=TLS(ca=pki["ca"]), timeout=HANG) as client:
        assert client.health(timeout=HANG) == "SERVING"
        assert client.health("jalora.v1.Jalora") == "SERVING"


def test_the_token_guards_reflection(tls_token_server, pki):
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.secure_channel(tls_token_server, grpc.ssl_channel_credentials(Path(pki["ca"]).read_bytes())) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([request]), timeout=HANG))
        assert err.value.code() == UNAUTHENTICATED
        answers = stub.ServerReflectionInfo(iter([request]), timeout=HANG, metadata=[("authorization",
                                            f"Bearer {TOKEN}")])  # fmt: skip
        assert "jalora.v1.Jalora" in {s.name for a in answers for s in a.list_services_response.service}


def test_adapter_changes_need_the_admin_token(tls_token_server, pki):
    tls = TLS(ca=pki["ca"])
    with Client(tls_token_server, tls=tls, token=TOKEN, timeout=HANG) as user, \
            Client(tls_token_server, tls=tls, token=ADMIN_TOKEN, timeout=HANG) as admin, \
            Client(tls_token_server, tls=tls, timeout=HANG) as anonymous:  # fmt: skip
        with pytest.raises(ServerError) as err:
            user.load_adapter("safety", "safety")
        assert err.value.code == PERMISSION_DENIED
        assert err.value.details == "LoadAdapter needs the admin token, not this one"
        with pytest.raises(ServerError) as err:
            anonymous.load_adapter("safety", "safety")
        assert err.value.code == UNAUTHENTICATED and "LoadAdapter needs the admin token" in err.value.details
        assert user.list_adapters() == []
        info = admin.load_adapter("safety", "safety")
        assert info.kind == "alora" and [a.name for a in user.list_adapters()] == ["safety"]
        assert _code(lambda: user.unload_adapter("safety")) == PERMISSION_DENIED
        assert _code(lambda: anonymous.unload_adapter("safety")) == UNAUTHENTICATED
        admin.unload_adapter("safety")
        assert admin.list_adapters() == []  # the admin token passes for every other call too


def test_admin_token_alone_leaves_other_calls_open(engine, pki):
    with _serving(engine, admin_token_file=pki["admin_token"], adapter_roots=[str(ADAPTERS)]) as target:
        with Client(target, timeout=HANG) as anonymous, Client(target, token=ADMIN_TOKEN, timeout=HANG) as admin:
            assert anonymous.list_adapters() == []
            assert _code(lambda: anonymous.load_adapter("safety", "safety")) == UNAUTHENTICATED
            admin.load_adapter("safety", "safety")
            admin.unload_adapter("safety")


# ---- reflection, server options ------------------------------------------------------------------


def _reflected_services(target: str) -> set[str] | grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            answers = list(stub.ServerReflectionInfo(iter([request]), timeout=HANG))
        except grpc.RpcError as err:
            return err.code()
        return {s.name for a in answers for s in a.list_services_response.service}


def test_no_reflection_removes_the_reflection_service(engine):
    with _serving(engine) as target:
        assert "jalora.v1.Jalora" in _reflected_services(target)
    with _serving(engine, reflection=False) as target:
        assert _reflected_services(target) == grpc.StatusCode.UNIMPLEMENTED
        with Client(target, timeout=HANG) as client:
            assert client.health(timeout=HANG) == "SERVING" and client.list_adapters() == []
    args = cli.build_parser().parse_args(["serve", "--model", "tiny", "--no-reflection"])
    assert cli.serve_plan(args).server_config.reflection is False


def test_server_options_reach_grpc(engine):
    config = ServerConfig(keepalive_time=30, keepalive_timeout=5.5, max_connection_age=900,
                          max_connection_age_grace=60, max_concurrent_streams=8)  # fmt: skip
    options = dict(server_options(config))
    assert options["grpc.keepalive_time_ms"] == 30_000 and options["grpc.keepalive_timeout_ms"] == 5_500
    assert options["grpc.max_connection_age_ms"] == 900_000 and options["grpc.max_connection_age_grace_ms"] == 60_000
    assert options["grpc.max_concurrent_streams"] == 8
    defaults = dict(server_options(ServerConfig()))
    assert "grpc.max_connection_age_ms" not in defaults and defaults["grpc.max_concurrent_streams"] == 1024
    with _serving(engine, **{k: v for k, v in vars(config).items() if k.startswith(("keep", "max_con"))}) as target:
        with Client(target, timeout=HANG) as client:
            assert client.health(timeout=HANG) == "SERVING"
    args = cli.build_parser().parse_args(["serve", "--model", "tiny", "--keepalive-time", "30", "--keepalive-timeout",
                                          "5.5", "--max-connection-age", "900", "--max-connection-age-grace", "60",
                                          "--max-concurrent-streams", "8"])  # fmt: skip
    assert cli.serve_plan(args).server_config == config


@pytest.mark.parametrize("field, value", [("max_concurrent_streams", 10**10), ("keepalive_time", 1e12),
                                          ("max_connection_age", 1e12), ("keepalive_timeout", 10**400),
                                          ("grace", 10**400), ("max_connection_age_grace", float("nan"))])  # fmt: skip
def test_channel_values_past_grpcs_32_bit_arguments_are_refused_at_the_command_line(field, value, capsys):
    """gRPC takes these as 32-bit ints (the times in ms) and would fail the start after the warm-up; an int too
    large for a float is not a number of seconds. Both are refused before the model is read."""
    with pytest.raises(InvalidRequestError) as err:
        ServerConfig(**{field: value})
    assert err.value.field == field and str(err.value).count(field) == 1
    flag = "--" + field.replace("_", "-")
    assert cli.main(["serve", "--model", "/nowhere", flag, str(value)]) == 2
    assert capsys.readouterr().err.startswith(f"jalora serve: {field}: ")


# ---- configuration and the command line -----------------------------------------------------------


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("::", False), ("10.1.2.3", False), ("example.com", False)])  # fmt: skip
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_a_non_loopback_host_needs_tls_and_client_authentication(pki):
    tls = dict(tls_cert=pki["server"], tls_key=pki["server_key"])
    for config in (dict(), dict(auth_token_file=pki["token"]), tls, dict(tls, admin_token_file=pki["admin_token"])):
        with pytest.raises(InvalidRequestError) as err:
            ServerConfig(host="0.0.0.0", **config)
        assert err.value.field == "host" and "--insecure" in err.value.message
    ServerConfig(host="0.0.0.0", auth_token_file=pki["token"], **tls)
    ServerConfig(host="0.0.0.0", tls_client_ca=pki["ca"], **tls)  # client certificates authenticate too
    ServerConfig(host="0.0.0.0", insecure=True)
    ServerConfig(host="localhost")


@pytest.fixture()
def unloadable_model(tmp_path):
    """A model whose config.json is not JSON: a check that comes after the model load would show."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    return str(tmp_path / "model")


def test_serve_refuses_a_non_loopback_host_before_the_model_loads(unloadable_model, capsys):
    assert cli.main(["serve", "--model", unloadable_model, "--host", "0.0.0.0", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "jalora serve: host: 0.0.0.0 is not a loopback address: serving it needs TLS (--tls-cert, --tls-key) "
        "and client authentication (--auth-token-file or --tls-client-ca); --insecure serves it without them\n"
    )
    args = cli.build_parser().parse_args(["serve", "--model", "tiny", "--host", "0.0.0.0", "--insecure"])
    assert cli.serve_plan(args).server_config.insecure is True


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--tls-key", "{server_key}"], "tls_key: needs --tls-cert, the certificate it belongs to"),
        (["--tls-cert", "{server}"], "tls_cert: needs --tls-key, its private key"),
        (["--tls-client-ca", "{ca}"], "tls_client_ca: needs TLS: --tls-cert and --tls-key"),
        (["--tls-cert", "{missing}", "--tls-key", "{server_key}"],
         "tls_cert: cannot read {missing}: no such file or directory"),
        (["--tls-cert", "{dir}", "--tls-key", "{server_key}"], "tls_cert: {dir} is not a file"),
        (["--auth-token-file", "{empty}"], "auth_token_file: {empty} holds no token"),
        (["--admin-token-file", "{missing}"], "admin_token_file: cannot read {missing}: no such file or directory"),
        (["--auth-token-file", "{spaced}"],
         "auth_token_file: {spaced} must hold one token of printable ASCII without spaces"),
    ],
)  # fmt: skip
def test_bad_tls_and_token_files_are_one_error_naming_the_field(pki, tmp_path, unloadable_model, capsys, flags, error):
    files = dict(pki, missing=str(tmp_path / "missing"), dir=str(tmp_path), empty=str(tmp_path / "empty"),
                 spaced=str(tmp_path / "spaced"))  # fmt: skip
    Path(files["empty"]).write_text("\n")
    Path(files["spaced"]).write_text("two words\n")
    argv = ["serve", "--model", unloadable_model, "--port", "0", *(f.format(**files) for f in flags)]
    assert cli.main(argv) == 2
    assert capsys.readouterr() == ("", f"jalora serve: {error.format(**files)}\n")


def test_preflight_checks_the_pem_contents_before_the_model_loads(pki, tmp_path, unloadable_model, capsys):
    garbage = str(tmp_path / "garbage.pem")
    Path(garbage).write_text("not a certificate")
    argv = ["serve", "--model", unloadable_model, "--port", "0"]
    assert cli.main([*argv, "--tls-cert", pki["server"], "--tls-key", pki["client_key"]]) == 2
    assert capsys.readouterr() == ("", f"jalora serve: tls_key: {pki['client_key']} is not the private key of "
                                       f"{pki['server']}\n")  # fmt: skip
    assert cli.main([*argv, "--tls-cert", garbage, "--tls-key", garbage, "--tls-client-ca", garbage]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"jalora serve: tls_cert: {garbage} holds no PEM certificate",
        f"jalora serve: tls_client_ca: {garbage} holds no PEM certificate",
    ]
    assert cli.main([*argv, "--tls-cert", pki["server"], "--tls-key", garbage]) == 2
    assert capsys.readouterr() == ("", f"jalora serve: tls_key: {garbage} holds no unencrypted PEM private key\n")


def test_demo_takes_no_certificates_or_tokens(capsys):
    for flag in ("--tls-cert", "--auth-token-file", "--admin-token-file"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["demo", flag, "x"])
    capsys.readouterr()


def test_client_commands_take_tls_and_a_token(tls_token_server, pki, capsys):
    base = ["generate", "hello", "--max-tokens", "1", "--target", tls_token_server, "--timeout", str(HANG)]
    assert cli.main([*base, "--tls-ca", pki["ca"], "--token-file", pki["token"]]) == 0
    out, err = capsys.readouterr()
    assert "[length] prompt=" in err or "[stop] prompt=" in err, err
    assert cli.main([*base, "--tls-ca", pki["ca"]]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("jalora generate: UNAUTHENTICATED: ") and err.count("\n") == 1, err
    assert cli.main([*base, "--tls-ca", pki["ca"], "--tls-key", pki["client_key"]]) == 2
    assert capsys.readouterr().err == (
        "jalora generate: --tls-key: needs --tls-cert, the client certificate it belongs to\n"
    )
    assert cli.main([*base, "--tls-ca", pki["ca"], "--token-file", pki["ca"] + ".missing"]) == 2
    assert capsys.readouterr().err == (f"jalora generate: --token-file: cannot read {pki['ca']}.missing: no such file "
                                       "or directory\n")  # fmt: skip
    # Files that are not what the flag needs: named before connecting (not gRPC's own log lines and "no server")
    for flags, want in ((["--tls-ca", pki["token"]], f"--tls-ca: {pki['token']} holds no PEM certificate"),
                        (["--tls-ca", pki["ca"], "--tls-cert", pki["client"], "--tls-key", pki["server_key"]],
                         f"--tls-key: {pki['server_key']} is not the private key of {pki['client']}")):  # fmt: skip
        assert cli.main([*base, *flags]) == 2
        assert capsys.readouterr() == ("", f"jalora generate: {want}\n")


def test_pipeline_takes_mutual_tls(mtls_server, pki, capsys):
    argv = ["pipeline", "--target", mtls_server, "--timeout", str(HANG), "--tls-ca", pki["ca"]]
    assert cli.main([*argv, "--tls-cert", pki["client"], "--tls-key", pki["client_key"]]) == 2
    assert capsys.readouterr().err == "jalora pipeline: the server has no aLoRA adapters to judge with\n"
    for flags in ([], ["--tls-ca", pki["rogue_ca"]]):  # no client certificate; a server we do not trust
        assert cli.main([*argv, *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"jalora pipeline: cannot connect to {mtls_server} (") and err.count("\n") == 1, err
        assert err.endswith("a server that serves TLS needs --tls-ca (and --tls-cert/--tls-key if it asks for a "
                            "client certificate), a plaintext one none of them\n")  # fmt: skip
    plaintext = [a for a in argv if a not in ("--tls-ca", pki["ca"])]
    assert cli.main([*plaintext, "--wait", str(HANG)]) == 1  # fails at once: a server is there
    assert capsys.readouterr().err.startswith(f"jalora pipeline: cannot connect to {mtls_server} (")
