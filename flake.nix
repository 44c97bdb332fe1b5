# guest-agent as a flake: the NixOS module, the package and an overlay.
#
#   inputs.guest-agent = {
#     url = "path:/src/guest-agent";   # where you keep this repository
#     inputs.nixpkgs.follows = "nixpkgs";
#   };
#   modules = [ microvm.nixosModules.microvm guest-agent.nixosModules.default … ];
#
# See docs/nixos.md.
{
  description = "guest-agent: mounts a microVM guest's shares, volumes and /nix/store overlay in stage 1";

  # Users set `inputs.nixpkgs.follows`: the module and the package are built
  # with the guest's own nixpkgs.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      package = pkgs: pkgs.python3Packages.callPackage ./initrd-hooks/nixos/package.nix { };
    in
    {
      # The module's default package is package.nix built with the guest's pkgs.
      nixosModules.default = ./initrd-hooks/nixos/module.nix;
      nixosModules.guest-agent = self.nixosModules.default;

      overlays.default = final: _prev: { guest-agent = package final; };

      packages = lib.genAttrs systems (
        system:
        let
          guest-agent = package nixpkgs.legacyPackages.${system};
        in
        {
          inherit guest-agent;
          default = guest-agent;
        }
      );
    };
}
