# What tests/unit/test_nixos_eval.py checks of flake.nix (flake-outputs.nix):
#   nix-instantiate --eval --strict --json tests/nixos/eval-flake.nix -A report
{
  lib ? import ./vendor/nixpkgs-lib/lib,
}:
let
  inherit (import ./flake-outputs.nix { inherit lib; }) flake outputs pkgs;
  # nixpkgs applies an overlay as a fixed point: final is the result
  overlaid = pkgs // outputs.overlays.default overlaid pkgs;
  describe = p: {
    inherit (p) name stubOf;
    python = toString p.python;
  };
in
{
  report = {
  inherit (flake) description;
  inputs = flake.inputs;
  outputsArgs = builtins.functionArgs flake.outputs;
  outputNames = builtins.attrNames outputs;
  nixosModules = lib.mapAttrs (_: toString) outputs.nixosModules;
  # the module eval.nix evaluates
  evaluatedModule = toString (import ./eval.nix { inherit lib; }).agentModule;
  systems = builtins.attrNames outputs.packages;
  package = describe outputs.packages.x86_64-linux.default;
  packageNames = builtins.attrNames outputs.packages.x86_64-linux;
  overlayPackage = describe overlaid.guest-agent;
  overlayNames = builtins.attrNames (outputs.overlays.default overlaid pkgs);
};
}
