# The outputs of the repository's flake.nix, offline: its `outputs` function
# called with a nixpkgs input made of the pinned nixpkgs lib and the package
# stand-ins of stub-pkgs.nix (the host's Nix 2.8 cannot lock the flake's
# nixpkgs input without the network). `self` is the outputs themselves, as
# Nix makes it.
{
  lib ? import ./vendor/nixpkgs-lib/lib,
}:
let
  flake = import ../../flake.nix;
  pkgs = import ./stub-pkgs.nix { inherit lib; };
  nixpkgs = {
    inherit lib;
    # only x86_64-linux has stand-ins; the other systems are not forced
    legacyPackages.x86_64-linux = pkgs;
  };
  outputs = flake.outputs {
    self = outputs // {
      outPath = toString ../..;
    };
    inherit nixpkgs;
  };
in
{
  inherit flake outputs pkgs;
}
