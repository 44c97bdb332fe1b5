# What nixpkgs' stage-1.nix substitutes into stage-1-init.sh (bootStage1's
# replacements), computed from the evaluation of guest-agent's module with
# microvm.nix's (eval.nix's evalCase), for the cases of stage1-cases.nix:
#
#   nix-instantiate --eval --strict --json tests/nixos/stage1.nix -A share
#
# Values stage-1.nix takes from options the stub does not declare (verbose,
# checkJournalingFS, the *Commands hooks, specialFileSystems...) are read
# from the configuration when a module sets them, else nixpkgs' defaults.
# The placeholders naming derivations NixOS builds (extraUtils,
# modulesClosure, udevRules, linkUnits) are left to the test's initramfs
# builder (tests/vm/nixos_stage1.py), which says what it puts there.
{
  lib ? import ./vendor/nixpkgs-lib/lib,
  cases ? import ./stage1-cases.nix,
}:
let
  ev0 = import ./eval.nix { inherit lib cases; };

  # nixos/lib/utils.nix fsBefore: a before b when b lives under a.
  fsBefore =
    a: b:
    let
      normalisePath = path: "${path}${lib.optionalString (!(lib.hasSuffix "/" path)) "/"}";
      normalise =
        mount:
        mount
        // {
          device = normalisePath (toString mount.device);
          mountPoint = normalisePath mount.mountPoint;
          depends = map normalisePath mount.depends;
        };
      a' = normalise a;
      b' = normalise b;
    in
    lib.hasPrefix a'.mountPoint b'.device
    || lib.hasPrefix a'.mountPoint b'.mountPoint
    || lib.any (lib.hasPrefix a'.mountPoint) b'.depends;

  # nixos/modules/tasks/filesystems.nix: boot.specialFileSystems (not a
  # container) with the default sizes of boot.devSize, devShmSize, runSize
  # and the tty group (ids.nix: 3).
  defaultSpecialFileSystems = {
    "/proc" = {
      fsType = "proc";
      options = [ "nosuid" "noexec" "nodev" ];
    };
    "/run" = {
      fsType = "tmpfs";
      options = [ "nosuid" "nodev" "strictatime" "mode=755" "size=25%" ];
    };
    "/dev" = {
      fsType = "devtmpfs";
      options = [ "nosuid" "strictatime" "mode=755" "size=5%" ];
    };
    "/dev/shm" = {
      fsType = "tmpfs";
      options = [ "nosuid" "nodev" "strictatime" "mode=1777" "size=50%" ];
    };
    "/dev/pts" = {
      fsType = "devpts";
      options = [ "nosuid" "noexec" "mode=620" "ptmxmode=0666" "gid=3" ];
    };
    "/run/keys" = {
      fsType = "ramfs";
      options = [ "nosuid" "nodev" "mode=750" ];
    };
    "/sys" = {
      fsType = "sysfs";
      options = [ "nosuid" "noexec" "nodev" ];
    };
  };

  stage1 =
    name: case:
    let
      ev = ev0.evalCase case { };
      config = ev0.checked ev.config;
      utils = ev._module.args.utils;
      initrd = config.boot.initrd;
      # filesystems.nix: system.build.fileSystems, stage-1.nix: those
      # fsNeededForBoot
      sorted = (lib.toposort fsBefore (lib.attrValues config.fileSystems)).result;
      fileSystems = lib.filter utils.fsNeededForBoot sorted;
      fsInfoLines =
        fs:
        if fs.overlay.lowerdir or null != null then
          throw "stage1.nix: ${fs.mountPoint} is an overlay fileSystems entry stage 1 would mount (overlayfs.nix's translation is not done here)"
        else
          [
            fs.mountPoint
            (if fs.device != null then fs.device else "/dev/disk/by-label/${fs.label}")
            fs.fsType
            (builtins.concatStringsSep "," fs.options)
          ];
      special = lib.mapAttrsToList (mountPoint: fs: fs // { inherit mountPoint; }) (
        config.boot.specialFileSystems or defaultSpecialFileSystems
      );
      specialSorted =
        (lib.toposort fsBefore (
          map (
            fs:
            {
              device = fs.fsType;
              depends = [ ];
            }
            // fs
          ) special
        )).result;
      # filesystems.nix makeSpecialMounts
      earlyMountScript = lib.concatMapStringsSep "\n" (
        fs: ''specialMount "${fs.device}" "${fs.mountPoint}" "${lib.concatStringsSep "," fs.options}" "${fs.fsType}"''
      ) specialSorted;
      # (networking.* is freeform in the stub: only a string is a host id)
      hostId =
        let
          h = config.networking.hostId or null;
        in
        if lib.isString h then h else null;
      # replaceVarsWith turns true into "1", false and null into ""
      str =
        v:
        if v == true then
          "1"
        else if v == false || v == null then
          ""
        else if lib.isList v then
          lib.concatStringsSep " " (map toString v)
        else
          toString v;
      fileOf = f: {
        path = toString f;
        text = f.text or null;
      };
    in
    {
      # bootStage1's replacements (stage-1.nix), each a string
      replacements = lib.mapAttrs (_: str) {
        verbose = initrd.verbose or true;
        checkJournalingFS = initrd.checkJournalingFS or true;
        preLVMCommands = initrd.preLVMCommands or "";
        preDeviceCommands = initrd.preDeviceCommands or "";
        postDeviceCommands = initrd.postDeviceCommands or "";
        preFailCommands = initrd.preFailCommands or "";
        inherit (initrd) postMountCommands kernelModules;
        resumeDevice = config.boot.resumeDevice or "";
        resumeDevices = [ ];
        setHostId = lib.optionalString (hostId != null) ''
          hi="${hostId}"
          echo -ne "\x''${hi:6:2}\x''${hi:4:2}\x''${hi:2:2}\x''${hi:0:2}" > /etc/hostid
        '';
      };
      # the files replacements name (written into the initrd at these paths)
      fsInfo = lib.concatStringsSep "\n" (lib.concatMap fsInfoLines fileSystems);
      inherit earlyMountScript;
      stage1FileSystems = map (fs: fs.mountPoint) fileSystems;
      # boot.initrd.extraFiles: initrd path -> store path (and text, for writeText)
      extraFiles = lib.mapAttrs (_: f: fileOf f.source) initrd.extraFiles;
      extraUtilsCommands = initrd.extraUtilsCommands or "";
      availableKernelModules = initrd.availableKernelModules;
      agent = toString config.boot.initrd.guest-agent.package;
      inherit (config.boot.initrd.guest-agent) onFailure nixDatabase;
      toplevel = toString config.system.build.toplevel;
      # the command line microvm.nix's runner gives the kernel
      kernelParams = config.microvm.kernelParams;
      microvm = {
        inherit (config.microvm) storeOnDisk writableStoreOverlay;
        storeDiskType = if config.microvm.storeOnDisk then config.microvm.storeDiskType else null;
        shares = map (s: {
          inherit (s) tag proto source mountPoint;
        }) config.microvm.shares;
        volumes = map (v: {
          inherit (v) image mountPoint size;
          label = v.label or null;
          fsType = v.fsType or "ext4";
        }) config.microvm.volumes;
      };
    };
in
lib.mapAttrs stage1 cases
