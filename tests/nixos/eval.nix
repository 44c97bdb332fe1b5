# Evaluates guest-agent's NixOS module with nixpkgs' real lib.evalModules,
# together with microvm.nix's real guest modules (options.nix, mounts.nix,
# store-disk.nix, system.nix; pinned copies under vendor/) and the option
# stubs of stub-nixos.nix, and reports what the tests compare, as JSON:
#
#   nix-instantiate --eval --strict --json tests/nixos/eval.nix -A report \
#     --arg cases 'import tests/nixos/cases.nix'
#
# `failing.<name>` forces what NixOS forces when it builds the system: the
# assertions (thrown with the message, as top-level.nix does) and the config.
{
  lib ? import ./vendor/nixpkgs-lib/lib,
  cases ? import ./cases.nix,
  withMicrovm ? true,
}:
let
  microvm = ./vendor/microvm.nix/nixos-modules/microvm;
  # microvm.nix's own drive letters (lib/default.nix withDriveLetters)
  microvmLib = import ./vendor/microvm.nix/lib { inherit lib; };
  # the flake's nixosModules.default (flake.nix, called as flake-outputs.nix does)
  agentModule = (import ./flake-outputs.nix { inherit lib; }).outputs.nixosModules.default;

  evalCase =
    case: extra:
    lib.evalModules {
      class = "nixos";
      modules = [
        ./stub-nixos.nix
        agentModule
        case.module
        extra
      ]
      ++ lib.optionals (case.microvm or true) [
        (microvm + "/options.nix")
        (microvm + "/mounts.nix")
        (microvm + "/store-disk.nix")
        (microvm + "/system.nix")
      ];
    };

  # What NixOS's top-level.nix does before it builds anything.
  checked =
    config:
    let
      failed = map (x: x.message) (lib.filter (x: !x.assertion) config.assertions);
    in
    if failed != [ ] then
      throw "\nFailed assertions:\n${lib.concatMapStringsSep "\n" (m: "- ${m}") failed}"
    else
      config;

  utilsOf = ev: ev._module.args.utils;

  report1 =
    case:
    let
      ev = evalCase case { };
      # The same configuration with the agent's module left out of
      # fileSystems: what microvm.nix alone declares.
      baseline = evalCase case { boot.initrd.guest-agent.takeOverMounts = lib.mkForce false; };
      config = checked ev.config;
      cfg = config.boot.initrd.guest-agent;
      utils = utilsOf ev;
      fsReport = fileSystems: lib.mapAttrs (_: f: {
        inherit (f)
          mountPoint
          device
          fsType
          options
          neededForBoot
          overlay
          ;
        # what stage 1 mounts (nixos/lib/utils.nix fsNeededForBoot)
        inInitrd = utils.fsNeededForBoot f;
      }) fileSystems;
      svc = config.boot.initrd.systemd.services.guest-agent or null;
    in
    {
      warnings = config.warnings;
      mountsJson = config.environment.etc."guest-agent/mounts.json".source.text;
      mountsJsonPath = toString config.environment.etc."guest-agent/mounts.json".source;
      fileSystems = fsReport config.fileSystems;
      baselineFileSystems = fsReport (checked baseline.config).fileSystems;
      options = {
        inherit (cfg)
          shares
          volumes
          writableStoreOverlay
          storeLower
          resetPolicy
          onFailure
          nixDatabase
          takeOverMounts
          fromMicrovm
          ;
      };
      initrdSystemd = config.boot.initrd.systemd.enable;
      postMountCommands = config.boot.initrd.postMountCommands;
      extraUtilsCommands = config.boot.initrd.extraUtilsCommands;
      extraUtilsCommandsTest = config.boot.initrd.extraUtilsCommandsTest;
      initrdBin = map toString config.boot.initrd.systemd.initrdBin;
      extraFiles = lib.mapAttrs (_: f: toString f.source) config.boot.initrd.extraFiles;
      initrdContents = lib.mapAttrs (_: f: toString f.source) config.boot.initrd.systemd.contents;
      storePaths = map toString config.boot.initrd.systemd.storePaths;
      service =
        if svc == null then
          null
        else
          {
            inherit (svc)
              description
              wantedBy
              requires
              after
              before
              conflicts
              unitConfig
              serviceConfig
              ;
            # the script ExecStart runs, from the initrd's store paths
            execStartText =
              (lib.findFirst (p: "${p}" == svc.serviceConfig.ExecStart) { text = null; }
                config.boot.initrd.systemd.storePaths
              ).text;
          };
      statusService = config.systemd.services.guest-agent-status or null;
      availableKernelModules = config.boot.initrd.availableKernelModules;
      microvm = lib.optionalAttrs (case.microvm or true) {
        inherit (config.microvm) registerClosure kernelParams storeOnDisk writableStoreOverlay;
        storeDiskType = if config.microvm.storeOnDisk then config.microvm.storeDiskType else null;
        driveLetters = map (v: {
          inherit (v) mountPoint label letter;
        }) (microvmLib.withDriveLetters config.microvm);
      };
      toplevel = toString config.system.build.toplevel;
      systemChecks = map (c: c.name) config.system.checks;
      package = {
        inherit (cfg.package) name;
        python = toString cfg.package.python;
      };
    };
in
{
  inherit agentModule;
  # for tests/nixos/stage1.nix (nixpkgs' scripted stage 1, substituted)
  inherit evalCase checked;
  report = lib.mapAttrs (_: report1) (lib.filterAttrs (_: c: !(c.fails or false)) cases);
  # nix-instantiate --eval --strict -A failing.<name> (must fail)
  failing = lib.mapAttrs (_: c: report1 c) (lib.filterAttrs (_: c: c.fails or false) cases);
  # A case's systemd initrd, as tests/vm/test_nixos_systemd_initrd.py boots it
  # (-A systemdInitrd.<name>): the case's report (guest-agent.service, the
  # fileSystems stage 1 mounts, the JSON config), the agent package's store
  # path, and nixpkgs' own initrd units (nixpkgs-initrd.nix).
  systemdInitrd = lib.mapAttrs (
    _: c:
    report1 c
    // {
      packagePath = toString (evalCase c { }).config.boot.initrd.guest-agent.package;
      nixpkgs = import ./nixpkgs-initrd.nix { inherit lib; };
    }
  ) (lib.filterAttrs (_: c: !(c.fails or false)) cases);
}
