# A user's flake with the lines docs/nixos.md gives; the test overrides the
# two inputs' URLs (this repository, the stub nixpkgs) and reads `check`.
{
  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    guest-agent = {
      url = "path:/src/guest-agent";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      guest-agent,
    }:
    {
      check = {
        module = builtins.hashFile "sha256" guest-agent.nixosModules.default;
        package = guest-agent.packages.x86_64-linux.default.name;
        overlay = builtins.attrNames (guest-agent.overlays.default { } { });
        # the follows: guest-agent's nixpkgs is the user's
        sameNixpkgs = guest-agent.inputs.nixpkgs.outPath == nixpkgs.outPath;
      };
    };
}
