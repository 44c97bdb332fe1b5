# What nixpkgs' systemd initrd module (vendor/nixpkgs-initrd, an unchanged
# copy of nixos/modules/system/boot/systemd/initrd.nix) defines for the
# initrd, read by applying the module's function to stand-in arguments and
# taking its `config` (a mkIf whose content is plain attributes): the units it
# declares (initrd-find-nixos-closure, initrd-nixos-activation, the
# initrd-switch-root override, panic-on-fail, the /sysroot/run mount) with
# their scripts, the upstream units it copies from the systemd package, the
# generators and tools it puts into the initrd, and system.conf.
#
# Store paths become the places the Debian 13 initrd of
# tests/vm/test_nixos_systemd_initrd.py has them: the systemd, util-linux and
# coreutils packages are /usr, the runtime shell is Debian's bash, and
# chroot-realpath (a nixpkgs tool) is the test's stand-in under `paths`.
{
  lib,
  paths ? {
    systemd = "/usr";
    util-linux = "/usr";
    coreutils = "/usr";
    runtimeShell = "/usr/bin/bash";
    chroot-realpath = "/opt/chroot-realpath";
  },
}:
let
  stub = path: { outPath = path; };
  module = import ./vendor/nixpkgs-initrd/nixos/modules/system/boot/systemd/initrd.nix {
    inherit lib;
    options = { };
    utils.systemdUtils.lib.generateUnits = args: args;
    # the merged option values the module reads (its own definitions among them)
    config.boot.resumeDevice = "";
    config.environment.etc = { };
    config.boot.initrd.systemd = {
      root = "fstab";
      package = stub paths.systemd // {
        util-linux = stub paths.util-linux;
      };
      additionalUpstreamUnits = [ ];
      suppressedUnits = [ ];
      extraConfig = "";
      inherit (initrd) managerEnvironment;
      services = { };
      contents = { };
    };
    pkgs = {
      inherit (paths) runtimeShell;
      coreutils = stub paths.coreutils;
      chroot-realpath = stub paths.chroot-realpath;
      bash = stub "/usr";
      glibc = stub "/usr/lib/x86_64-linux-gnu";
    };
  };
  initrd = module.config.content.boot.initrd.systemd;
  units = initrd.contents."/etc/systemd/system".source;
  service = name: {
    inherit (lib.recursiveUpdate serviceDefaults initrd.services.${name})
      description
      after
      before
      requires
      wants
      conflicts
      requiredBy
      wantedBy
      unitConfig
      serviceConfig
      script
      ;
  };
  # the service submodule's defaults (nixos/lib/systemd-unit-options.nix)
  serviceDefaults = {
    description = "";
    after = [ ];
    before = [ ];
    requires = [ ];
    wants = [ ];
    conflicts = [ ];
    requiredBy = [ ];
    wantedBy = [ ];
    unitConfig = { };
    serviceConfig = { };
    script = "";
  };
in
{
  inherit (units) upstreamUnits upstreamWants;
  services = lib.genAttrs [
    "initrd-find-nixos-closure"
    "initrd-nixos-activation"
    "initrd-switch-root"
    "panic-on-fail"
  ] service;
  mounts = map (
    m:
    {
      unitConfig = { };
      before = [ ];
      requiredBy = [ ];
    }
    // m
  ) initrd.mounts;
  generators = lib.filter (p: lib.hasInfix "/system-generators/" p) initrd.storePaths;
  systemConf = initrd.contents."/etc/systemd/system.conf".text;
  kernelParams = lib.filter (p: lib.hasPrefix "root=" p) module.config.content.boot.kernelParams;
}
