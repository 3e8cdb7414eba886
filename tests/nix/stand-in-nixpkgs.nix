# A stand-in for the parts of nixpkgs that workflow/envs/flake.nix uses, so that its outputs evaluate offline
# (tests/test_envs.py). Nothing is built: each function returns its arguments, tagged with what was
# called, for tests/nix/describe.nix to read. Only python311 exists, as only it is meant to be used.
let
  chars = s: builtins.genList (i: builtins.substring i 1 s) (builtins.stringLength s);
  tool = name: { kind = "tool"; inherit name; };

  python311 = {
    kind = "python";
    version = "3.11.14";
    interpreter = "/stand-in/python3.11/bin/python3.11";
    pkgs = {
      pip = tool "pip";
      setuptools = tool "setuptools";
      wheel = tool "wheel";
      toPythonModule = drv: drv // { pythonModule = "python311"; };
    };
    withPackages = select: {
      kind = "python.withPackages";
      python = "python311";
      pythonVersion = python311.version;
      modules = select python311.pkgs;
    };
  };

  pkgs = {
    inherit python311;
    fetchurl = { url, sha256, name ? null }: { kind = "fetchurl"; inherit url sha256 name; };
    stdenv = {
      mkDerivation = args: args // { kind = "mkDerivation"; };
      cc.cc.lib = tool "libstdc++";
    };
    zlib = tool "zlib";
    autoPatchelfHook = tool "autoPatchelfHook";
    addDriverRunpath = tool "addDriverRunpath";
    mkShell = args: args // { kind = "mkShell"; };
  };
in
{
  lib.toLower = builtins.replaceStrings (chars "ABCDEFGHIJKLMNOPQRSTUVWXYZ") (chars "abcdefghijklmnopqrstuvwxyz");
  legacyPackages.x86_64-linux = pkgs;
}
