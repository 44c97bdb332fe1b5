# A stand-in for nixpkgs' package set, for evaluation only: every package or
# builder the modules under test ask for (guest-agent's module and
# microvm.nix's mounts.nix, store-disk.nix, system.nix) returns a value shaped
# like a derivation (type = "derivation", a /nix/store outPath) that is never
# built. writeText / writeShellScript keep their text, so the tests can read
# the JSON config and the stage-1 script the module hands over.
#
# Not a stand-in for any module: modules are evaluated for real by
# lib.evalModules; this only replaces the packages they reference.
{ lib }:
let
  # A store path with a 32-character hash part, as lib.isStorePath expects.
  fakeDrv =
    name: attrs:
    let
      hash = builtins.substring 0 32 (
        builtins.hashString "sha256" (name + builtins.toJSON (attrs.key or attrs.text or ""))
      );
      self =
        {
          type = "derivation";
          inherit name;
          outPath = "/nix/store/${hash}-${name}";
          drvPath = "/nix/store/${hash}-${name}.drv";
          outputName = "out";
          outputs = [ "out" ];
          out = self;
          overrideAttrs = _: self;
        }
        // attrs;
    in
    self;

  python = fakeDrv "python3-3.12" {
    interpreter = "${python}/bin/python3";
    stubOf = "python3";
  };

  stdenv = {
    hostPlatform = lib.systems.elaborate "x86_64-linux";
    buildPlatform = lib.systems.elaborate "x86_64-linux";
    targetPlatform = lib.systems.elaborate "x86_64-linux";
  };

  pkgs = {
    inherit lib stdenv;
    system = "x86_64-linux";
    writeText = name: text: fakeDrv name { inherit text; };
    writeShellScript = name: text: fakeDrv name {
      text = "#!${pkgs.runtimeShell}\n" + text;
      executable = true;
    };
    runtimeShell = "/nix/store/00000000000000000000000000000000-bash/bin/bash";
    runCommand = name: env: text: fakeDrv name { inherit env text; };
    runCommandLocal = pkgs.runCommand;
    # named by its roots: the same roots, the same path (as with nixpkgs')
    closureInfo =
      { rootPaths }:
      fakeDrv "closure-info" {
        inherit rootPaths;
        key = map toString rootPaths;
      };
    writeClosure = paths: fakeDrv "closure" { inherit paths; };
    coreutils = fakeDrv "coreutils-9.5" { };
    systemd = fakeDrv "systemd-256" { };
    time = fakeDrv "time" { };
    bubblewrap = fakeDrv "bubblewrap" { };
    erofs-utils = fakeDrv "erofs-utils" { configureFlags = [ ]; };
    # the mkfs tools (guest-agent's autoFormat)
    e2fsprogs = fakeDrv "e2fsprogs-1.47.1-bin" { };
    xfsprogs = fakeDrv "xfsprogs-6.11.0-bin" { };
    btrfs-progs = fakeDrv "btrfs-progs-6.12" { };
    dosfstools = fakeDrv "dosfstools-4.2" { };
    squashfs-tools-ng = fakeDrv "squashfs-tools-ng" { };
    buildPackages = pkgs;
    python3 = python;
    # package.nix is called for real, with builders that return stand-ins.
    python3Packages = {
      inherit python;
      callPackage = lib.callPackageWith (
        pkgs
        // {
          inherit python;
          setuptools = fakeDrv "setuptools" { };
          click = fakeDrv "click" { };
          buildPythonApplication =
            args:
            fakeDrv "${args.pname}-${args.version}" (
              {
                stubOf = "buildPythonApplication";
                inherit (args) pname version meta;
              }
              // args.passthru or { }
            );
        }
      );
    };
  };
in
pkgs // { inherit fakeDrv; }
