# The pipeline's exact Python environment, in a CPU and a CUDA variant:
#   nix develop ./workflow/envs#cpu    nix develop ./workflow/envs#cuda    nix build ./workflow/envs#cuda
# No nixpkgs release carries the versions pyproject.toml pins, so nixpkgs gives only CPython 3.11
# and the build tools; every Python distribution is the file pip resolves for those pins, fetched by
# the URL and sha256 that workflow/envs/lock-wheels recorded in wheels.json. The pins themselves are read
# from ../../pyproject.toml, and evaluation stops if wheels.json lacks one of them at its pinned
# version, so the environment cannot drift from pyproject.toml unnoticed (tests/test_envs.py).
{
  description = "gpt2-speedrun-pipeline: the Python environment pinned in pyproject.toml (CPU and CUDA)";

  # flake.lock holds nixos-25.11 at 8fd9daa3db09ced9700431c5b7ad0e8ba199b575 (2026-05-10). Its
  # narHash was not fetched here: it is the one public flake.lock files record for that revision,
  # and it equals the fetchTarball sha256 other public code gives for the same tarball.
  # `nix flake update --flake ./workflow/envs` moves to a newer nixos-25.11.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux"; # the platform of every file in wheels.json
      pkgs = nixpkgs.legacyPackages.${system};
      inherit (nixpkgs) lib;
      python = pkgs.python311;

      pyproject = builtins.fromTOML (builtins.readFile ../../pyproject.toml);
      lock = builtins.fromJSON (builtins.readFile ./wheels.json);

      # PEP 503 names ("PyYAML" and "pyyaml" are one distribution).
      normalize = name: lib.toLower (builtins.replaceStrings [ "_" "." ] [ "-" "-" ] name);
      parsePin = req:
        let m = builtins.match " *([A-Za-z0-9][A-Za-z0-9._-]*) *== *([^ ;]+) *" req;
        in if m == null then throw "pyproject.toml: '${req}' is not an exact pin (name==version)"
           else { name = normalize (builtins.elemAt m 0); version = builtins.elemAt m 1; };
      extraReqs = extra: pyproject.project.optional-dependencies.${extra}
        or (throw "workflow/envs/wheels.json locks the extra '${extra}', which pyproject.toml lacks: rerun workflow/envs/lock-wheels");
      # The runtime pins, and the pins of the extras wheels.json was locked with (e.g. slurm).
      pins = map parsePin (pyproject.project.dependencies ++ builtins.concatMap extraReqs lock.extras);

      # torch's CPU build is "2.13.0+cpu": like pip's ==, a pin without a local label ignores it.
      satisfies = pin: file: file.name == pin.name && (file.version == pin.version
        || builtins.substring 0 (builtins.stringLength pin.version + 1) file.version == "${pin.version}+");
      lockedFiles = variant:
        let
          files = lock.variants.${variant};
          check = pin: builtins.any (satisfies pin) files
            || throw "workflow/envs/wheels.json (${variant}) lacks ${pin.name}==${pin.version} that pyproject.toml pins: rerun workflow/envs/lock-wheels";
        in assert builtins.all check pins; files;

      fetch = file: pkgs.fetchurl { inherit (file) url sha256; name = file.file; };

      # One prefix for all of a variant's distributions: torch finds the nvidia-* wheels' libraries
      # through RPATHs relative to itself ($ORIGIN/../../nvidia/...), which resolve only when they
      # share one site-packages. autoPatchelf then points every ELF file at nixpkgs' libraries.
      sitePackages = variant: python.pkgs.toPythonModule (pkgs.stdenv.mkDerivation {
        pname = "gpt2-speedrun-site-packages-${variant}";
        inherit (pyproject.project) version;
        srcs = map fetch (lockedFiles variant);
        dontUnpack = true;
        dontStrip = true; # the wheels' libraries are vendor builds, used as shipped
        # python's setup hook puts pip and setuptools on PYTHONPATH (setuptools builds the one sdist).
        nativeBuildInputs = [ python python.pkgs.pip python.pkgs.setuptools python.pkgs.wheel pkgs.autoPatchelfHook ]
          ++ (if variant == "cuda" then [ pkgs.addDriverRunpath ] else [ ]);
        # What manylinux wheels expect of the system besides glibc.
        buildInputs = [ pkgs.stdenv.cc.cc.lib pkgs.zlib ];
        # The GPU driver's library comes from the host at run time, not from the store.
        autoPatchelfIgnoreMissingDeps = [ "libcuda.so.1" "libnvidia-ml.so.1" ];
        installPhase = ''
          runHook preInstall
          mkdir dist
          for f in $srcs; do cp "$f" "dist/$(stripHash "$f")"; done
          # --ignore-installed: the lock's own setuptools and packaging go into $out; without it pip
          # would try to uninstall the build's copies from the read-only store instead.
          ${python.interpreter} -m pip install --no-index --no-deps --no-build-isolation --ignore-installed \
            --no-cache-dir --disable-pip-version-check --prefix "$out" dist/*
          runHook postInstall
        '';
        # NixOS puts the driver's libraries in /run/opengl-driver/lib; this adds it to their search path.
        postFixup = if variant == "cuda" then ''
          find "$out" -type f -name '*.so*' -exec addDriverRunpath {} \;
        '' else "";
      });

      # python.withPackages wraps the interpreter and the console scripts (snakemake, wandb, ...).
      env = variant: python.withPackages (_: [ (sitePackages variant) ]);
      envs = { cpu = env "cpu"; cuda = env "cuda"; };
      shell = variant: pkgs.mkShell { packages = [ envs.${variant} ]; };
    in
    {
      packages.${system} = envs // { default = envs.cpu; };
      devShells.${system} = { cpu = shell "cpu"; cuda = shell "cuda"; default = shell "cpu"; };
    };
}
