# workflow/envs/flake.nix's outputs evaluated against tests/nix/stand-in-nixpkgs.nix, as plain data: for each
# package and dev shell, the Python it wraps and every file its site-packages is installed from.
#   nix-instantiate --eval --strict --json -E "import ./tests/nix/describe.nix { }"
{ flake ? ../../workflow/envs/flake.nix }:
let
  nixpkgs = import ./stand-in-nixpkgs.nix;
  outputs = (import flake).outputs { self = outputs; inherit nixpkgs; };

  module = m: {
    inherit (m) kind pname version;
    pythonModule = m.pythonModule or null;
    tools = map (t: t.name or t.kind) (m.nativeBuildInputs ++ m.buildInputs);
    files = map (f: { inherit (f) kind name url sha256; }) m.srcs;
    inherit (m) installPhase;
  };
  env = e: {
    inherit (e) kind python pythonVersion;
    modules = map module e.modules;
  };
  shell = s: {
    inherit (s) kind;
    packages = map env s.packages;
  };
in
{
  packages = builtins.mapAttrs (_: env) outputs.packages.x86_64-linux;
  devShells = builtins.mapAttrs (_: shell) outputs.devShells.x86_64-linux;
}
