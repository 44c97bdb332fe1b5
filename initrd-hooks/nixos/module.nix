# NixOS module for guest-agent: mounts a microVM guest's virtio shares, volumes
# and the /nix/store overlay in stage 1, after the root is mounted and before
# the switch to it. Works with the scripted stage 1 (postMountCommands) and
# with the systemd initrd (boot.initrd.systemd.enable: a service ordered after
# sysroot.mount and before initrd-fs.target).
#
#   imports = [ guest-agent.nixosModules.default ];   # the flake (flake.nix)
#   # or, from a checkout: imports = [ ./guest-agent/initrd-hooks/nixos/module.nix ];
#   boot.initrd.guest-agent = {
#     enable = true;
#     fromMicrovm = true;   # take shares, volumes, writableStoreOverlay from microvm.*
#     nixDatabase = true;   # optional: a Nix database that survives reboots (x-nix-db)
#   };
#
# See docs/nixos.md for a complete microvm.nix guest.
{
  config,
  lib,
  pkgs,
  options,
  utils,
  ...
}:
let
  cfg = config.boot.initrd.guest-agent;
  inherit (lib)
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    types
    ;

  shareType = types.submodule {
    options = {
      tag = mkOption {
        type = types.str;
        description = "The virtio tag the hypervisor gives the share (9p mount_tag, virtiofs tag).";
      };
      mountPoint = mkOption {
        type = types.str;
        description = "Where to mount it, inside the target root.";
      };
      proto = mkOption {
        type = types.enum [
          "9p"
          "virtiofs"
          "auto"
        ];
        default = "auto";
        description = "Transport; `auto` finds it out from the virtio devices.";
      };
      readOnly = mkOption {
        type = types.bool;
        default = false;
        description = "Mount read-only.";
      };
      options = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Mount options (fstab style); `nofail`, `x-device-timeout=S` are the agent's own.";
      };
    };
  };

  volumeType = types.submodule {
    options = {
      label = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "File system label of the volume (found without udev).";
      };
      uuid = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "File system UUID of the volume.";
      };
      serial = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "virtio-blk serial the hypervisor sets.";
      };
      device = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "A /dev path (when there is no label, uuid or serial).";
      };
      mountPoint = mkOption {
        type = types.str;
        description = "Where to mount it, inside the target root.";
      };
      fsType = mkOption {
        type = types.str;
        default = "auto";
        description = "Kernel file system type, or `auto` to probe it.";
      };
      readOnly = mkOption {
        type = types.bool;
        default = false;
        description = "Mount read-only.";
      };
      autoFormat = mkOption {
        type = types.bool;
        default = false;
        description = "Format a blank disk with fsType (x-makefs; never touches a disk with any signature).";
      };
      options = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Mount options (fstab style).";
      };
    };
  };

  hasMicrovm = options ? microvm;
  # microvm.nix's switch for stage 2's `nix-store --load-db` of the closure.
  hasRegisterClosure = lib.hasAttrByPath [
    "microvm"
    "registerClosure"
  ] options;
  # microvm.nix's options, translated (used with fromMicrovm = true).
  microvmShares = map (s: {
    inherit (s) tag mountPoint;
    proto = s.proto or "9p";
    readOnly = s.readOnly or (s.tag == "ro-store");
    options = [ ];
  }) (lib.filter (s: (s.mountPoint or null) != null) (config.microvm.shares or [ ]));
  # microvm.nix's drive letters (lib/default.nix withDriveLetters): every
  # entry of microvm.volumes is attached, with a mount point or not, in
  # order, from vda, or from vdb after the store disk with storeOnDisk.
  microvmStoreOnDisk = config.microvm.storeOnDisk or false;
  volumeOffset = if microvmStoreOnDisk then 1 else 0;
  # The store disk (storeOnDisk) under the overlay: microvm.nix's mounts.nix
  # mounts it at /nix/.ro-store, by its label (erofs, made with -L nix-store)
  # or as /dev/vda (squashfs). The agent mounts it with the rest, before the
  # overlay it is the lower of.
  microvmStoreDisk = lib.optional (microvmStoreOnDisk && config.microvm.writableStoreOverlay != null) (
    let
      erofs = config.microvm.storeDiskType == "erofs";
    in
    {
      label = if erofs then "nix-store" else null;
      uuid = null;
      serial = null;
      device = if erofs then null else "/dev/vda";
      mountPoint = "/nix/.ro-store";
      fsType = config.microvm.storeDiskType;
      readOnly = true;
      autoFormat = false;
      options = [ ];
    }
  );
  # The overlay's lower, as mounts.nix has it: the store disk's mount point,
  # or the mount point of the share whose source is the host's /nix/store.
  microvmStoreLower =
    if microvmStoreOnDisk then
      "/nix/.ro-store"
    else
      let
        hostStore = lib.filter (s: s.source == "/nix/store") (config.microvm.shares or [ ]);
      in
      # (storeLower's own default when no share serves the host's store)
      if hostStore == [ ] then "/nix/.ro-store" else (lib.head hostStore).mountPoint;
  # As mounts.nix mounts them: the volumes with a mount point, by label, else
  # by drive letter (a serial, which mounts.nix ignores, is not used either).
  microvmVolumes =
    microvmStoreDisk
    ++ lib.filter (v: v.mountPoint != null) (
      lib.imap0 (i: v: {
        label = v.label or null;
        uuid = null;
        serial = null;
        device =
          if (v.label or null) == null then
            "/dev/vd${builtins.elemAt lib.strings.lowerChars (i + volumeOffset)}"
          else
            null;
        mountPoint = v.mountPoint or null;
        fsType = v.fsType or "ext4";
        readOnly = v.readOnly or false;
        autoFormat = false;
        options = [ ];
      }) (config.microvm.volumes or [ ])
    );

  agentConfig = import ./config.nix {
    inherit (cfg)
      shares
      volumes
      writableStoreOverlay
      storeLower
      overlayOptions
      resetPolicy
      nixDatabase
      ;
  };

  # nixDatabase: the registration of the system's closure, as microvm.nix
  # (store-disk.nix) and qemu-vm.nix make it: the same derivation, so the same
  # store path. It cannot go into the JSON config: the config is in the initrd,
  # the initrd in the system's closure (a cycle); it goes on the kernel command
  # line, which is outside the closure.
  regInfo = pkgs.closureInfo { rootPaths = [ config.system.build.toplevel ]; };
  # The agent reconciles the database with the standard library's sqlite3, in
  # the initrd: the agent's Python must have it (its closure, libsqlite3
  # included, goes into the initrd with the agent). Checked at build time when
  # the package says which Python it runs with (package.nix does).
  agentPython = cfg.package.python or null;
  canRunHostCode = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
  sqliteCheck = pkgs.runCommand "guest-agent-python-has-sqlite3" { } ''
    ${agentPython.interpreter} -c 'import sqlite3; sqlite3.connect(":memory:").execute("create table t (x)")'
    touch $out
  '';
  configFile = pkgs.writeText "guest-agent-mounts.json" (builtins.toJSON agentConfig);

  managedMountPoints =
    map (s: s.mountPoint) cfg.shares
    ++ map (v: v.mountPoint) cfg.volumes
    ++ lib.optional (cfg.writableStoreOverlay != null) "/nix/store";

  # What takeOverMounts touches: with microvm.nix's module, only the mount
  # points it declares as fileSystems (mounts.nix: shares, volumes with a
  # mount point, /nix/store with an overlay, the store disk under it); an
  # entry made here for another would have no device. Without it, all.
  microvmMountPoints =
    map (s: s.mountPoint) (config.microvm.shares or [ ])
    ++ lib.filter (mp: mp != null) (map (v: v.mountPoint) (config.microvm.volumes or [ ]))
    ++ lib.optionals ((config.microvm.writableStoreOverlay or null) != null) (
      [ "/nix/store" ] ++ lib.optional microvmStoreOnDisk "/nix/.ro-store"
    );
  # Without an overlay, mounts.nix bind-mounts the host store share onto
  # /nix/store, in stage 1 (a path stage 1 always mounts): the share stays
  # stage 1's too, or the bind would find it empty. The agent finds it
  # mounted (already-mounted).
  stage1KeepsHostStore =
    hasMicrovm
    && !microvmStoreOnDisk
    && (config.microvm.writableStoreOverlay or null) == null
    && microvmStoreLower != "/nix/store";
  takeOverPoints =
    if hasMicrovm then
      lib.filter (
        mp: lib.elem mp microvmMountPoints && !(stage1KeepsHostStore && mp == microvmStoreLower)
      ) managedMountPoints
    else
      managedMountPoints;

  # NixOS's stage 1 mounts a file system when neededForBoot is set or when
  # its mount point is one of utils.pathsNeededForBoot ("/nix/store"
  # among them; nixos/lib/utils.nix fsNeededForBoot): for those,
  # neededForBoot = false is not enough, the entry must go (its `enable`).
  pathsNeededForBoot =
    utils.pathsNeededForBoot or [
      "/"
      "/nix"
      "/nix/store"
      "/var"
      "/var/log"
      "/var/lib"
      "/var/lib/nixos"
      "/etc"
      "/usr"
    ];
  fsHasEnable = (options.fileSystems.type.getSubOptions [ ]) ? enable;

  # The share an overlay upper directory lives on (the longest mount point
  # that holds it), if it is a share.
  shareHolding =
    dir:
    let
      holding = lib.filter (s: s.mountPoint == dir || lib.hasPrefix "${s.mountPoint}/" dir) cfg.shares;
      holdingVolumes = lib.filter (
        v: v.mountPoint == dir || lib.hasPrefix "${v.mountPoint}/" dir
      ) cfg.volumes;
      longest = lib.foldl' (
        a: s: if a == null || lib.stringLength s.mountPoint > lib.stringLength a.mountPoint then s else a
      ) null (holding ++ holdingVolumes);
    in
    if longest != null && longest ? tag then longest else null;
  upperShare = if cfg.writableStoreOverlay == null then null else shareHolding cfg.writableStoreOverlay;
  duplicates = xs: lib.unique (lib.filter (x: lib.count (y: y == x) xs > 1) xs);
  tagsTwice = duplicates (map (s: s.tag) cfg.shares);
  mountPointsTwice = duplicates (map (s: s.mountPoint) cfg.shares ++ map (v: v.mountPoint) cfg.volumes);

  agent = "${cfg.package}/bin/guest-agent";
  args = lib.escapeShellArgs cfg.extraArgs;

  # With the store overlay taken over, nothing but the agent mounts
  # /nix/store: the off switch would strand the boot (no stage 2 init, no
  # closure), so it is ignored there, with one line saying so.
  storeTakenOver = cfg.takeOverMounts && lib.elem "/nix/store" takeOverPoints;
  offIgnored = ''echo "guest-agent: $GUEST_AGENT_OFF ignored: this system's /nix/store is mounted by guest-agent alone (takeOverMounts); without it the boot has no store. To boot without the agent, build the system with boot.initrd.guest-agent.takeOverMounts = false"'';
  # The boot switches (docs/reference.md, Switches), read as every target reads them.
  # BEGIN generated by tools/switches_shell.py from guest_agent/config/switches.py: do not edit
  switchesShell = ''
    # guest_agent_switches WORD...: the boot switches in the words of the kernel
    # command line (docs/reference.md, Switches); the last of each kind wins.
    #   GUEST_AGENT_OFF     the switch that turned the agent off (a word that
    #                       turns it on empties it)
    #   GUEST_AGENT_ONFAIL  continue or shell, when a word names it
    # A value it does not know gets a line, and changes nothing.
    guest_agent_switches() {
      for x in "$@"; do
        case "$x" in
        guest-agent=0 | guest-agent=no | guest-agent=off | guest-agent=false | rd.guest-agent=0 | rd.guest-agent=no | rd.guest-agent=off | rd.guest-agent=false)
          GUEST_AGENT_OFF=$x ;;
        guest_agent=0 | guest_agent=no | guest_agent=off | guest_agent=false)
          GUEST_AGENT_OFF="$x (the old spelling of guest-agent=, read until the next release)" ;;
        rd.guest_agent=0 | rd.guest_agent=no | rd.guest_agent=off | rd.guest_agent=false)
          GUEST_AGENT_OFF="$x (the old spelling of rd.guest-agent=, read until the next release)" ;;
        guest-agent=1 | guest-agent=yes | guest-agent=on | guest-agent=true | rd.guest-agent=1 | rd.guest-agent=yes | rd.guest-agent=on | rd.guest-agent=true | guest_agent=1 | guest_agent=yes | guest_agent=on | guest_agent=true | rd.guest_agent=1 | rd.guest_agent=yes | rd.guest_agent=on | rd.guest_agent=true)
          GUEST_AGENT_OFF= ;;
        guest-agent.onfail=continue | rd.guest-agent.onfail=continue | guest_agent.onfail=continue | rd.guest_agent.onfail=continue)
          GUEST_AGENT_ONFAIL=continue ;;
        guest-agent.onfail=shell | rd.guest-agent.onfail=shell | guest_agent.onfail=shell | rd.guest_agent.onfail=shell)
          GUEST_AGENT_ONFAIL=shell ;;
        guest-agent=* | rd.guest-agent=* | guest_agent=* | rd.guest_agent=*)
          echo "guest-agent: $x ignored: the switch takes 0, no, off, false (off) or 1, yes, on, true (on)" ;;
        guest-agent.onfail=* | rd.guest-agent.onfail=* | guest_agent.onfail=* | rd.guest_agent.onfail=*)
          echo "guest-agent: $x ignored: the failure switch takes continue or shell" ;;
        esac
      done
    }
  '';
  # END generated
  # The kernel command line: the failure policy and the off switch (the word
  # that turned the agent off, in $GUEST_AGENT_OFF).
  readCmdline = switchesShell + ''
    GUEST_AGENT_ONFAIL=${cfg.onFailure}
    GUEST_AGENT_OFF=
    guest_agent_switches $(cat /proc/cmdline)
  '';
  offLine = ''echo "guest-agent: disabled by $GUEST_AGENT_OFF: not mounting anything"'';
  # stage 2's guest-agent-status.service: skipped (not failed) when the agent was off
  switchedOn = pkgs.writeShellScript "guest-agent-switched-on" (
    switchesShell
    + ''
      GUEST_AGENT_OFF=
      guest_agent_switches $(cat /proc/cmdline)
      [ -z "$GUEST_AGENT_OFF" ] || { echo "guest-agent: off ($GUEST_AGENT_OFF): not checking"; exit 1; }
    ''
  );

  # Scripted stage 1: runs in postMountCommands, target root /mnt-root.
  # stage-1-init.sh's fail() prints none of its arguments: the line first.
  # Its stderr is copied into /dev/kmsg (as "stage-1-init: …"), where the agent writes
  # each line itself: the agent's stderr goes to the console directly (logErrFd), so
  # that dmesg has each line once.
  runScripted = ''
    agentErr=2
    if [ -n "''${logErrFd-}" ] && [ -w /dev/kmsg ]; then agentErr=$logErrFd; fi
    if ! ${agent} mount-all --root "$targetRoot" --config /etc/guest-agent/mounts.json ${args} 2>&$agentErr; then
      if [ "$GUEST_AGENT_ONFAIL" = shell ]; then
        # Under boot.panic_on_fail, fail exits at once: a line on stdout could still
        # be in stage 1's tee when the kernel panics. The kernel log is printed
        # before the panic, so the line goes there when stage 1 copies to it.
        failLine="guest-agent: a required mount failed (see above); guest-agent.onfail=shell"
        if [ "$agentErr" = 2 ]; then echo "$failLine"; else echo "<3>$failLine" > /dev/kmsg; fi
        fail
      else
        echo "guest-agent: a required mount failed (see above); continuing the boot (guest-agent.onfail=continue)"
      fi
    fi
  '';
  scriptedCommands =
    readCmdline
    + (
      if storeTakenOver then
        ''
          [ -n "$GUEST_AGENT_OFF" ] && ${offIgnored}
        ''
        + runScripted
      else
        ''
          if [ -n "$GUEST_AGENT_OFF" ]; then
            ${offLine}
          else
        ''
        + runScripted
        + ''
          fi
        ''
    );

  # autoFormat: the mkfs tools for the volumes that ask, by fsType. The agent
  # looks in PATH for mkfs.<fsType>, then (ext2/3/4) mke2fs -t <fsType>
  # (guest_agent/handlers/makefs.py); busybox's mke2fs has no -t.
  mkfsToolOf = {
    ext2 = "e2fs";
    ext3 = "e2fs";
    ext4 = "e2fs";
    xfs = "xfs";
    btrfs = "btrfs";
    vfat = "vfat";
  };
  mkfsTools = {
    e2fs = {
      package = pkgs.e2fsprogs;
      programs = [ "mke2fs" ];
      links = [
        "mkfs.ext2"
        "mkfs.ext3"
        "mkfs.ext4"
      ];
      check = "mke2fs -V";
    };
    xfs = {
      package = pkgs.xfsprogs;
      programs = [ "mkfs.xfs" ];
      links = [ ];
      check = "mkfs.xfs -V";
    };
    btrfs = {
      package = pkgs.btrfs-progs;
      programs = [ "mkfs.btrfs" ];
      links = [ ];
      check = "mkfs.btrfs --version";
    };
    vfat = {
      package = pkgs.dosfstools;
      programs = [ "mkfs.fat" ];
      links = [ "mkfs.vfat" ];
      check = null;
    };
  };
  formatTypes = lib.unique (map (v: v.fsType) (lib.filter (v: v.autoFormat) cfg.volumes));
  formatTypesWithoutTool = lib.filter (t: !(mkfsToolOf ? ${t})) formatTypes;
  formatTools = map (k: mkfsTools.${k}) (
    lib.unique (map (t: mkfsToolOf.${t}) (lib.filter (t: mkfsToolOf ? ${t}) formatTypes))
  );
  formatPackages = map (t: lib.getBin t.package) formatTools;
  # extra-utils: copied after busybox, so mke2fs replaces busybox's applet.
  formatUtilsCommands = lib.concatMapStrings (
    t:
    lib.concatMapStrings (p: "copy_bin_and_libs ${lib.getBin t.package}/bin/${p}\n") t.programs
    + lib.concatMapStrings (l: "ln -sf ${lib.head t.programs} $out/bin/${l}\n") t.links
  ) formatTools;
  formatUtilsCommandsTest = lib.concatMapStrings (
    t: lib.optionalString (t.check != null) "$out/bin/${t.check}\n"
  ) formatTools;

  # systemd stage 1: the same, as a service (see initrd-hooks/dracut/).
  initrdScript = pkgs.writeShellScript "guest-agent-initrd" (
    ''
      PATH=${
        lib.makeBinPath (
          [
            pkgs.coreutils
            config.boot.initrd.systemd.package
          ]
          ++ formatPackages
        )
      }:$PATH
    ''
    + readCmdline
    + (
      if storeTakenOver then
        ''
          [ -n "$GUEST_AGENT_OFF" ] && ${offIgnored}
        ''
      else
        ''
          if [ -n "$GUEST_AGENT_OFF" ]; then
            ${offLine}
            exit 0
          fi
        ''
    )
    + ''
      mkdir -p /run/guest-agent && : > /run/guest-agent/initrd-ran
      ${agent} mount-all --root /sysroot --config /etc/guest-agent/mounts.json ${args}
      rc=$?
      [ "$rc" -eq 0 ] && exit 0
      if [ "$GUEST_AGENT_ONFAIL" = shell ]; then
        echo "guest-agent: a required mount failed (exit status $rc); guest-agent.onfail=shell: starting emergency.target" > /dev/console
        systemctl --no-block --job-mode=replace-irreversibly start emergency.target
      else
        echo "guest-agent: a required mount failed (exit status $rc); continuing the boot (guest-agent.onfail=continue)" > /dev/console
      fi
      exit "$rc"
    ''
  );

  # The units of nixpkgs' systemd initrd that need /sysroot/nix/store
  # (nixos/modules/system/boot/systemd/initrd.nix, NixOS/nixpkgs
  # 00e6b22b508f93e219efee2dda4397027ccaf934): find-closure resolves init=
  # inside /sysroot (RequiresMountsFor=/sysroot/nix/store, which orders it
  # after sysroot.mount only when there is no sysroot-nix-store.mount: the
  # take-over), the activation chroots into it after initrd-switch-root.target,
  # initrd-switch-root.service switches to it; initrd-fs.target is systemd's
  # "/sysroot's file systems are mounted".
  unitsNeedingTheStore = [
    "initrd-fs.target"
    "initrd-find-nixos-closure.service"
    "initrd-nixos-activation.service"
    "initrd-switch-root.target"
    "initrd-switch-root.service"
  ];
in
{
  options.boot.initrd.guest-agent = {
    enable = mkEnableOption "guest-agent, which mounts the microVM's shares, volumes and /nix/store overlay in stage 1";

    package = mkOption {
      type = types.package;
      default = pkgs.python3Packages.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.python3Packages.callPackage ./package.nix { }";
      description = "The guest-agent package.";
    };

    fromMicrovm = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Take shares, volumes and writableStoreOverlay from microvm.nix's
        `microvm.shares`, `microvm.volumes` and `microvm.writableStoreOverlay`
        (needs microvm.nix's guest module).
      '';
    };

    takeOverMounts = mkOption {
      type = types.bool;
      default = cfg.fromMicrovm;
      defaultText = lib.literalExpression "config.boot.initrd.guest-agent.fromMicrovm";
      description = ''
        Let the agent, not stage 1's fstab handling, mount the managed mount
        points: sets `fileSystems.<mountPoint>.neededForBoot = false` for
        each that microvm.nix declares as fileSystems (for each managed
        mount point without microvm.nix), and disables `/nix/store`'s entry
        (stage 1 mounts it whatever neededForBoot says). Without a store
        overlay the host store share stays stage 1's (microvm.nix binds it
        onto /nix/store there). Stage 2 then finds them mounted.
      '';
    };

    shares = mkOption {
      type = types.listOf shareType;
      default = [ ];
      example = lib.literalExpression ''
        [ { tag = "ro-store"; mountPoint = "/nix/.ro-store"; proto = "virtiofs"; readOnly = true; } ]
      '';
      description = "virtio-9p / virtio-fs shares to mount.";
    };

    volumes = mkOption {
      type = types.listOf volumeType;
      default = [ ];
      example = lib.literalExpression ''
        [ { label = "nix-store"; mountPoint = "/nix/.rw-store"; fsType = "ext4"; } ]
      '';
      description = "virtio-blk volumes to mount.";
    };

    writableStoreOverlay = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/nix/.rw-store";
      description = ''
        Mount an overlay at /nix/store whose upper layer lives in this
        directory (`store/` and `work/` inside it), as microvm.nix's
        option of the same name.
      '';
    };

    storeLower = mkOption {
      type = types.str;
      default = "/nix/.ro-store";
      description = "The overlay's lower layer: the read-only store's mount point.";
    };

    overlayOptions = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Extra overlayfs options.";
    };

    resetPolicy = mkOption {
      type = types.enum [
        "on-request"
        "every-boot"
      ];
      default = "on-request";
      description = ''
        When to wipe the overlay's upper layer: `on-request` (at the boot
        after `guest-agent reset-overlay` / `systemctl start
        guest-agent-reset-overlay`, or with `microvm.reset-overlay` on the
        kernel command line), or at `every-boot` (without nixDatabase,
        Nix's database does not survive a reboot unless the root is
        persistent; with it, a reset resets the database too).
      '';
    };

    nixDatabase = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Keep the guest's Nix database across reboots and true to the lower
        store: adds the agent option `x-nix-db` to the store overlay. Nix's
        state directory `/nix/var/nix` then lives on the writable store volume
        (`<writableStoreOverlay>/nix-state`) and is bind-mounted at
        `/nix/var/nix`; at every boot `guest-agent mount-all`, in stage 1,
        reconciles the database with the lower store and registers its
        closure from `regInfo=` on the kernel command line, before anything
        can open it. Needs writableStoreOverlay and Nix (`nix.enable`).

        `microvm.registerClosure = false` goes with it: the agent now
        registers the closure, and stage 2's `nix-store --load-db` would
        overwrite the rows it keeps. With microvm.nix's guest module this
        option sets it (`mkDefault`; `true` is refused by an assertion) and
        puts `regInfo=` on `microvm.kernelParams` itself, since microvm.nix
        drops it with registerClosure. (qemu-vm.nix has no such switch: its
        stage 2 loads the registration anyway.)

        The agent's Python must have sqlite3 (the default package's does):
        checked at build time (`system.checks`).
      '';
    };

    onFailure = mkOption {
      type = types.enum [
        "continue"
        "shell"
      ];
      default = "continue";
      description = ''
        What stage 1 does when a required mount fails: `continue` (report it
        on the console and boot on) or `shell` (stage 1's failure handling:
        a shell, or a reboot with boot.panic_on_fail / rd.emergency).
        The kernel command line overrides it: guest-agent.onfail=continue|shell
        (or rd.guest-agent.onfail=).
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Extra arguments for `guest-agent mount-all`.";
    };

    kernelModules = mkOption {
      type = types.listOf types.str;
      default = [
        "virtio_pci"
        "virtio_mmio"
        "virtio_blk"
        "9p"
        "9pnet_virtio"
        "virtiofs"
        "overlay"
        "ext4"
        "erofs"
        "squashfs"
        "vmw_vsock_virtio_transport" # sd_notify to the host, only with vmm.notify_socket
      ];
      description = "Modules put into the initrd for the agent to load (it loads them itself, without udev).";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = cfg.fromMicrovm -> hasMicrovm;
          message = "boot.initrd.guest-agent.fromMicrovm needs microvm.nix's guest module (microvm.* options).";
        }
        {
          assertion = lib.all (
            v: lib.length (lib.filter (x: x != null) [ v.label v.uuid v.serial v.device ]) == 1
          ) cfg.volumes;
          message = "boot.initrd.guest-agent.volumes: give exactly one of label, uuid, serial, device.";
        }
        {
          assertion = formatTypesWithoutTool == [ ];
          message = "boot.initrd.guest-agent.volumes: autoFormat needs an fsType the initrd has a mkfs tool for (${lib.concatStringsSep ", " (lib.attrNames mkfsToolOf)}), not ${lib.concatStringsSep ", " formatTypesWithoutTool}.";
        }
        {
          assertion = tagsTwice == [ ];
          message = "boot.initrd.guest-agent.shares: the tag ${lib.concatStringsSep ", " tagsTwice} is used by more than one share (a virtio tag names one device).";
        }
        {
          assertion = mountPointsTwice == [ ];
          message = "boot.initrd.guest-agent: more than one share or volume is mounted at ${lib.concatStringsSep ", " mountPointsTwice}.";
        }
        {
          assertion = upperShare == null || upperShare.proto != "9p";
          message = "boot.initrd.guest-agent.writableStoreOverlay: ${toString cfg.writableStoreOverlay} is on the 9p share ${upperShare.tag or ""}; overlayfs cannot use 9p as its upper layer (use a volume, or a virtiofs share).";
        }
        {
          assertion = cfg.takeOverMounts -> fsHasEnable || !lib.any (mp: lib.elem mp pathsNeededForBoot && config.fileSystems ? ${mp}) managedMountPoints;
          message = "boot.initrd.guest-agent.takeOverMounts: this NixOS has no fileSystems.<name>.enable, so stage 1 would mount ${lib.concatStringsSep ", " (lib.filter (mp: lib.elem mp pathsNeededForBoot) managedMountPoints)} itself (neededForBoot = false does not stop it there).";
        }
      ];

      boot.initrd.availableKernelModules = cfg.kernelModules;

      # The running system: the same config for `guest-agent status` and
      # `guest-agent reset-overlay`.
      environment.etc."guest-agent/mounts.json".source = configFile;
      environment.systemPackages = [ cfg.package ];

      systemd.services.guest-agent-status = {
        description = "guest-agent: check the microVM's shares, volumes and store overlay";
        wantedBy = [ "multi-user.target" ];
        after = [ "local-fs.target" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecCondition = "${switchedOn}";
          ExecStart = "${agent} status";
        };
      };

      systemd.services.guest-agent-reset-overlay = {
        description = "guest-agent: reset the /nix/store overlay's upper layer (at the next boot)";
        after = [ "local-fs.target" ];
        serviceConfig = {
          Type = "oneshot";
          ExecStart = "${agent} reset-overlay";
        };
      };
    }

    (mkIf cfg.nixDatabase {
      assertions = [
        {
          assertion = cfg.writableStoreOverlay != null;
          message = "boot.initrd.guest-agent.nixDatabase needs a store overlay: set writableStoreOverlay (or microvm.writableStoreOverlay with fromMicrovm).";
        }
        {
          assertion = config.nix.enable;
          message = "boot.initrd.guest-agent.nixDatabase: the guest has no Nix (nix.enable = false).";
        }
        {
          assertion = hasRegisterClosure -> !config.microvm.registerClosure;
          message = "boot.initrd.guest-agent.nixDatabase: set microvm.registerClosure = false; the agent registers the closure at boot, and stage 2's nix-store --load-db would overwrite the rows it keeps.";
        }
      ];
      system.checks = lib.optional (agentPython != null && canRunHostCode) sqliteCheck;
      warnings = lib.optional (agentPython == null) "boot.initrd.guest-agent.nixDatabase: the package has no passthru.python, so nothing checks that its Python has sqlite3 (the agent needs it in the initrd).";
    })

    # With microvm.nix: no load-db in stage 2, regInfo= on the command line.
    # (optionalAttrs, not mkIf: without microvm.nix the options do not exist.)
    (lib.optionalAttrs hasRegisterClosure (
      mkIf cfg.nixDatabase {
        microvm.registerClosure = lib.mkDefault false;
        microvm.kernelParams = lib.optional config.nix.enable "regInfo=${regInfo}/registration";
      }
    ))

    (mkIf cfg.fromMicrovm {
      boot.initrd.guest-agent = {
        shares = lib.mkDefault microvmShares;
        volumes = lib.mkDefault microvmVolumes;
        writableStoreOverlay = lib.mkDefault (config.microvm.writableStoreOverlay or null);
        storeLower = lib.mkDefault microvmStoreLower;
      };
    })

    (mkIf cfg.takeOverMounts {
      fileSystems = lib.genAttrs takeOverPoints (
        mp:
        {
          neededForBoot = lib.mkForce false;
        }
        // lib.optionalAttrs (fsHasEnable && lib.elem mp pathsNeededForBoot) {
          enable = lib.mkForce false;
        }
      );
    })

    (mkIf (!config.boot.initrd.systemd.enable) {
      # The agent's closure (Python, click) is copied into the initrd with it.
      boot.initrd.extraFiles."/etc/guest-agent/mounts.json".source = configFile;
      boot.initrd.extraFiles."/guest-agent".source = cfg.package;
      boot.initrd.postMountCommands = lib.mkAfter scriptedCommands;
      boot.initrd.extraUtilsCommands = formatUtilsCommands;
      boot.initrd.extraUtilsCommandsTest = formatUtilsCommandsTest;
    })

    (mkIf config.boot.initrd.systemd.enable {
      boot.initrd.systemd.storePaths = [
        cfg.package
        initrdScript
      ]
      ++ formatPackages;
      # in /bin too, for the emergency shell
      boot.initrd.systemd.initrdBin = formatPackages;
      boot.initrd.systemd.contents."/etc/guest-agent/mounts.json".source = configFile;
      boot.initrd.systemd.services.guest-agent = {
        description = "guest-agent: mount microVM shares, volumes and the store overlay";
        wantedBy = [ "initrd-fs.target" ];
        requires = [ "sysroot.mount" ];
        after = [
          "sysroot.mount"
          "initrd-root-fs.target"
        ];
        before =
          unitsNeedingTheStore
          ++ map (mp: "${utils.escapeSystemdPath ("/sysroot" + mp)}.mount") managedMountPoints;
        conflicts = [ "shutdown.target" ];
        # (the script reads the off switch: the last switch word wins, which
        # ConditionKernelCommandLine= cannot say)
        unitConfig = {
          DefaultDependencies = false;
          ConditionPathExists = "!/run/guest-agent/initrd-ran";
        };
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${initrdScript}";
          StandardOutput = "journal+console";
          StandardError = "journal+console";
        };
      };
    })
  ]);
}
