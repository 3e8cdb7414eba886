"""workflow/envs/ agrees with pyproject.toml: the pip and conda pins, and the Python environment of the Nix flake.

The flake is evaluated offline by Debian's nix-bin against a stand-in nixpkgs (tests/nix/) that records
what the flake asks for instead of building it: these tests check which files each variant's package
and dev shell install from, and that they are the pinned versions with their hashes; they do not build
the environment (that needs nixpkgs and the wheels, several GB, from the network).
"""

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
ENVS = ROOT / "workflow" / "envs"
DESCRIBE = ROOT / "tests" / "nix" / "describe.nix"
NIX_INSTANTIATE = shutil.which("nix-instantiate")
NIX = shutil.which("nix")
needs_nix = pytest.mark.skipif(
    NIX_INSTANTIATE is None or NIX is None,
    reason="nix-instantiate/nix not found: install Debian's nix-bin (scripts/system-deps does, and CI runs it)",
)


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(reqs, where):
    pins = {}
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)\s*", req)
        assert m, f"{where}: {req!r} is not an exact pin (name==version)"
        name = normalize(m[1])
        assert name not in pins, f"{where}: {name} is pinned twice"
        pins[name] = m[2]
    return pins


def pin_mismatches(expected, actual):
    """What differs between two {name: version} pin sets, one line per package."""
    out = [f"{n}: missing (pyproject.toml pins {v})" for n, v in expected.items() if n not in actual]
    out += [f"{n}: {actual[n]} where pyproject.toml pins {v}" for n, v in expected.items()
            if n in actual and actual[n] != v]
    out += [f"{n}: pinned ({v}) but not in pyproject.toml" for n, v in actual.items() if n not in expected]
    return sorted(out)


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def runtime_pins():
    return parse_pins(pyproject()["project"]["dependencies"], "pyproject.toml [project] dependencies")


def wheel_lock():
    return json.loads((ENVS / "wheels.json").read_text())


def flake_pins():
    """What the flake installs by name: the runtime pins and those of the extras wheels.json locks."""
    project = pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in wheel_lock()["extras"]:
        assert extra in project.get("optional-dependencies", {}), (
            f"workflow/envs/wheels.json locks the extra {extra!r}, which pyproject.toml lacks: "
            "rerun workflow/envs/lock-wheels"
        )
        reqs += project["optional-dependencies"][extra]
    return parse_pins(reqs, "pyproject.toml")


# --- pip and conda pins -------------------------------------------------------------------------


def test_requirements_txt_pins_what_pyproject_pins():
    lines = [line.split("#")[0] for line in (ENVS / "requirements.txt").read_text().splitlines()]
    pins = parse_pins([line for line in lines if line.strip()], "workflow/envs/requirements.txt")
    assert pin_mismatches(runtime_pins(), pins) == []


@pytest.mark.parametrize("name, extras", [("environment.yaml", []), ("environment-hf.yaml", ["hf"])])
def test_environment_yaml_pins_what_pyproject_pins(name, extras):
    env = yaml.safe_load((ENVS / name).read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, f"workflow/envs/{name}: expected one pip: list"
    optional = pyproject()["project"]["optional-dependencies"]
    wanted = runtime_pins() | parse_pins([r for e in extras for r in optional[e]], "pyproject.toml")
    pins = [r for r in pip_lists[0] if not r.startswith("-e ")]
    assert pin_mismatches(wanted, parse_pins(pins, f"workflow/envs/{name}")) == []
    # and the checkout itself, editable: conda runs pip in the env file's folder, so the path is relative to it
    (editable,) = [r.split(None, 1)[1] for r in pip_lists[0] if r.startswith("-e ")]
    assert (ENVS / editable).resolve() == ROOT and (ENVS / editable / "pipeline" / "__init__.py").is_file()
    pythons = [d.split("=", 1)[1] for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert len(pythons) == 1 and pythons[0] in SpecifierSet(pyproject()["project"]["requires-python"])


def test_pin_comparison_reports_every_kind_of_drift():
    pins = runtime_pins()
    drifted = {**pins, "torch": "2.12.0", "einops": "0.8.1"}
    del drifted["tqdm"]
    assert pin_mismatches(pins, drifted) == [
        "einops: pinned (0.8.1) but not in pyproject.toml",
        f"torch: 2.12.0 where pyproject.toml pins {pins['torch']}",
        f"tqdm: missing (pyproject.toml pins {pins['tqdm']})",
    ]
    with pytest.raises(AssertionError, match="not an exact pin"):
        parse_pins(["torch>=2.13"], "x")


def test_lock_wheels_reads_the_pins_the_tests_read():
    loader = importlib.machinery.SourceFileLoader("lock_wheels", str(ENVS / "lock-wheels"))
    spec = importlib.util.spec_from_loader("lock_wheels", loader)
    lock_wheels = importlib.util.module_from_spec(spec)
    loader.exec_module(lock_wheels)
    extras = wheel_lock()["extras"]
    assert {normalize(n): v for n, v in lock_wheels.pins(pyproject(), extras).items()} == flake_pins()
    with pytest.raises(SystemExit, match="not an exact pin"):
        lock_wheels.pins({"project": {"dependencies": ["numpy>=2"]}}, [])


# --- the wheel lock -----------------------------------------------------------------------------


def dist_of(filename):
    """(normalized name, version) from a wheel's or an sdist's file name."""
    if filename.endswith(".whl"):
        name, version = filename.split("-")[:2]
    else:
        name, version = re.sub(r"\.(tar\.gz|zip)$", "", filename).rsplit("-", 1)
    return normalize(name), version


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_wheel_lock_entries_are_fetchable_and_hashed(variant):
    files = wheel_lock()["variants"][variant]
    names = [f["name"] for f in files]
    assert len(names) == len(set(names)), "a distribution is locked twice"
    for f in files:
        assert re.fullmatch(r"[0-9a-f]{64}", f["sha256"]), f
        assert f["url"].startswith("https://") and unquote(f["url"].rsplit("/", 1)[1]) == f["file"], f
        assert dist_of(f["file"]) == (f["name"], f["version"]), f
    # The lock was resolved for today's pins: a pin dropped from pyproject.toml would still be marked.
    assert {f["name"] for f in files if f["pinned"]} == set(flake_pins())


# --- the Nix flake ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nix(tmp_path_factory):
    """Runs nix-instantiate/nix offline: a store in a temporary folder (no /nix, no root needed), no
    daemon (NIX_REMOTE empty), no binary cache, and no build users (Debian's default names a nixbld
    group that does not exist here)."""
    home = tmp_path_factory.mktemp("nix")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"), "NIX_REMOTE": ""}
    opts = ["--store", str(home / "store"), "--option", "build-users-group", "", "--option", "substituters", ""]

    def run(tool, *args, cwd=ROOT):
        exe = {"nix-instantiate": NIX_INSTANTIATE, "nix": NIX}[tool]
        return subprocess.run([exe, *opts, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)

    return run


def describe(nix, flake=ENVS / "flake.nix"):
    """The flake's outputs as tests/nix/describe.nix reports them: (returncode, data or stderr)."""
    expr = f"import (/. + {json.dumps(str(DESCRIBE))}) {{ flake = /. + {json.dumps(str(flake))}; }}"
    proc = nix("nix-instantiate", "--eval", "--strict", "--json", "-E", expr)
    return proc.returncode, json.loads(proc.stdout) if proc.returncode == 0 else proc.stderr


@needs_nix
def test_nix_parses_the_flake_and_the_stand_in(nix, tmp_path):
    for path in [ENVS / "flake.nix", *sorted((ROOT / "tests" / "nix").glob("*.nix"))]:
        proc = nix("nix-instantiate", "--parse", str(path))
        assert proc.returncode == 0, f"{path}: {proc.stderr}"
    broken = tmp_path / "flake.nix"
    broken.write_text((ENVS / "flake.nix").read_text().replace("outputs = {", "outputs = {{", 1))
    assert nix("nix-instantiate", "--parse", str(broken)).returncode != 0


@pytest.fixture(scope="module")
def outputs(nix):
    rc, data = describe(nix)
    assert rc == 0, data
    return data


def installed_envs(outputs, kind, variant):
    """The Python environments a package or dev shell provides."""
    out = outputs[kind][variant]
    return [out] if kind == "packages" else out["packages"]


@needs_nix
@pytest.mark.parametrize("variant", ["cpu", "cuda"])
@pytest.mark.parametrize("kind", ["packages", "devShells"])
def test_flake_provides_exactly_the_locked_pinned_environment(outputs, kind, variant):
    envs = installed_envs(outputs, kind, variant)
    assert len(envs) == 1
    (env,) = envs
    assert env["kind"] == "python.withPackages" and env["python"] == "python311"
    assert env["pythonVersion"] in SpecifierSet(pyproject()["project"]["requires-python"])
    (module,) = env["modules"]
    assert module["pythonModule"] == "python311", "site-packages not marked as a module of its python"
    # The build installs the fetched files and nothing else: no index, no dependency resolution.
    assert re.search(r"pip install --no-index --no-deps .*dist/\*", " ".join(module["installPhase"].split()))

    files = module["files"]
    for f in files:
        assert f["kind"] == "fetchurl" and re.fullmatch(r"[0-9a-f]{64}", f["sha256"]), f
        assert unquote(f["url"].rsplit("/", 1)[1]) == f["name"], f
    installed = dict(dist_of(f["name"]) for f in files)
    assert len(installed) == len(files), "a distribution is installed twice"

    # Every pin at its version; torch's CPU build carries the local label +cpu, the CUDA one none.
    expected = dict(flake_pins())
    expected["torch"] += "+cpu" if variant == "cpu" else ""
    assert pin_mismatches(expected, {n: installed.get(n) for n in expected}) == []

    # Nothing but the lock, all of the lock: the dependencies pip resolved for those pins.
    locked = {(f["file"], f["url"], f["sha256"]) for f in wheel_lock()["variants"][variant]}
    assert {(f["name"], f["url"], f["sha256"]) for f in files} == locked


@needs_nix
def test_flake_variants_differ_in_their_torch_build(outputs):
    def names(variant):
        return {dist_of(f["name"])[0] for f in installed_envs(outputs, "packages", variant)[0]["modules"][0]["files"]}

    cpu, cuda = names("cpu"), names("cuda")
    assert {"triton", "nvidia-cublas", "nvidia-cuda-runtime"} <= cuda
    assert not {n for n in cpu if n.startswith("nvidia-") or n == "triton"}
    assert cpu - cuda == set(), "the CPU variant has a package the CUDA one lacks"
    assert outputs["packages"]["default"] == outputs["packages"]["cpu"]
    assert outputs["devShells"]["default"] == outputs["devShells"]["cpu"]


def copy_tree(tmp_path, pyproject_text=None, lock=None):
    """workflow/envs/flake.nix with its wheels.json and ../../pyproject.toml, copied (and changed) under tmp_path."""
    envs = tmp_path / "workflow" / "envs"
    envs.mkdir(parents=True)
    shutil.copy(ENVS / "flake.nix", envs / "flake.nix")
    (envs / "wheels.json").write_text(json.dumps(lock or wheel_lock()))
    (tmp_path / "pyproject.toml").write_text(pyproject_text or (ROOT / "pyproject.toml").read_text())
    return envs / "flake.nix"


@needs_nix
def test_flake_stops_when_pyproject_pins_a_version_the_lock_lacks(nix, tmp_path):
    pins = runtime_pins()
    text = (ROOT / "pyproject.toml").read_text().replace(f'"torch=={pins["torch"]}"', '"torch==2.12.0"')
    rc, err = describe(nix, copy_tree(tmp_path, pyproject_text=text))
    assert rc != 0 and "lacks torch==2.12.0" in err and "rerun workflow/envs/lock-wheels" in err


@needs_nix
def test_flake_stops_when_pyproject_gains_a_pin_the_lock_lacks(nix, tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    text = text.replace("dependencies = [", 'dependencies = [\n    "einops==0.8.1",', 1)
    rc, err = describe(nix, copy_tree(tmp_path, pyproject_text=text))
    assert rc != 0 and "lacks einops==0.8.1" in err


@needs_nix
def test_flake_stops_when_the_lock_holds_another_version(nix, tmp_path):
    lock = wheel_lock()
    for f in lock["variants"]["cuda"]:
        if f["name"] == "numpy":
            f["version"] = "2.4.5"
    rc, err = describe(nix, copy_tree(tmp_path, lock=lock))
    assert rc != 0 and f"(cuda) lacks numpy=={runtime_pins()['numpy']}" in err


@needs_nix
def test_flake_lock_pins_the_nixpkgs_branch_flake_nix_names(nix, tmp_path):
    flake = json.dumps(str(ENVS / "flake.nix"))
    proc = nix("nix-instantiate", "--eval", "--json", "-E", f"(import (/. + {flake})).inputs.nixpkgs.url")
    assert proc.returncode == 0, proc.stderr
    owner, repo, ref = re.fullmatch(r"github:([^/]+)/([^/]+)/([^/?]+)", json.loads(proc.stdout)).groups()

    lock = json.loads((ENVS / "flake.lock").read_text())
    assert lock["version"] == 7 and lock["nodes"]["root"]["inputs"] == {"nixpkgs": "nixpkgs"}
    node = lock["nodes"]["nixpkgs"]
    assert node["original"] == {"type": "github", "owner": owner, "repo": repo, "ref": ref}
    locked = node["locked"]
    assert (locked["type"], locked["owner"], locked["repo"]) == ("github", owner, repo)
    assert re.fullmatch(r"[0-9a-f]{40}", locked["rev"])
    assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked["narHash"])
    assert isinstance(locked["lastModified"], int)

    # Nix itself reads the lock as complete and current for flake.nix (nothing to fetch or update).
    # A copy, as a path: flake, keeps Nix from copying the whole git checkout into the store.
    shutil.copy(ENVS / "flake.nix", tmp_path / "flake.nix")
    shutil.copy(ENVS / "flake.lock", tmp_path / "flake.lock")
    proc = nix("nix", "--extra-experimental-features", "nix-command flakes", "flake", "metadata", "--json",
               "--offline", "--no-update-lock-file", f"path:{tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["locks"]["nodes"]["nixpkgs"]["locked"] == locked


@needs_nix
@pytest.mark.skipif(shutil.which("git") is None, reason="git not found")
@pytest.mark.parametrize("output", ["packages", "devShells"])
def test_flake_evaluates_as_a_flake_in_a_git_checkout(nix, tmp_path, output):
    """What `nix develop ./workflow/envs#cuda` does before building: Nix copies the checkout's tracked files
    to the store and evaluates workflow/envs/ as a flake, purely, reading ../../pyproject.toml from that copy. Here
    the lock's nixpkgs is overridden by the stand-in, made a flake."""
    repo = tmp_path / "repo"
    (repo / "workflow" / "envs").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    for name in ["flake.nix", "flake.lock", "wheels.json"]:
        shutil.copy(ENVS / name, repo / "workflow" / "envs" / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "checkout"], cwd=repo, check=True)
    stand_in = tmp_path / "stand-in"
    stand_in.mkdir()
    shutil.copy(ROOT / "tests" / "nix" / "stand-in-nixpkgs.nix", stand_in)
    (stand_in / "flake.nix").write_text("{ outputs = _: import ./stand-in-nixpkgs.nix; }\n")

    files = "e: map (f: f.name) (builtins.head e.modules).srcs"
    envs = "(o: o.packages)" if output == "devShells" else "(o: [ o ])"
    proc = nix("nix", "--extra-experimental-features", "nix-command flakes", "eval", "--json", "--offline",
               "--no-write-lock-file", "--override-input", "nixpkgs", f"path:{stand_in}",
               f"git+file://{repo}?dir=workflow/envs#{output}.x86_64-linux",
               "--apply", f"builtins.mapAttrs (_: o: map ({files}) ({envs} o))", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert set(got) == {"cpu", "cuda", "default"}
    for variant in ["cpu", "cuda"]:
        assert got[variant] == [[f["file"] for f in wheel_lock()["variants"][variant]]]
