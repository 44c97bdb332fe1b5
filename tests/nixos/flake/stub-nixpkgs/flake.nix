# A nixpkgs input for evaluating flakes offline: nixpkgs' pinned lib and the
# package stand-ins of stub-pkgs.nix (x86_64-linux only). Used with
# `--override-input nixpkgs git+file://<repo>?dir=tests/nixos/flake/stub-nixpkgs`.
{
  outputs =
    { self }:
    let
      lib = import ../../vendor/nixpkgs-lib/lib;
    in
    {
      inherit lib;
      legacyPackages.x86_64-linux = import ../../stub-pkgs.nix { inherit lib; };
    };
}
