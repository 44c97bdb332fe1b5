# The NixOS options that guest-agent's module and microvm.nix's guest modules
# (options.nix, mounts.nix, store-disk.nix, system.nix) read or set, declared
# with the types nixpkgs' nixos/modules give them (types copied, modules not:
# the option implementations — fstab, stage 1, unit generation — are not
# here). Everything else those modules define is taken by a freeform type.
#
# Sources of the types (nixpkgs, nixos/):
#   modules/tasks/filesystems.nix        fileSystems.<name>.{mountPoint,device,fsType,options,depends,label,autoFormat,autoResize,noCheck}
#   modules/system/boot/stage-1.nix      fileSystems.<name>.neededForBoot, boot.initrd.{availableKernelModules,kernelModules,extraFiles,postMountCommands,extraUtilsCommands,extraUtilsCommandsTest}
#   modules/tasks/filesystems/overlayfs.nix  fileSystems.<name>.overlay.{lowerdir,upperdir,workdir}
#   modules/system/boot/kernel.nix       boot.kernelParams, boot.blacklistedKernelModules
#   modules/system/boot/systemd/initrd.nix boot.initrd.systemd.{enable,package,storePaths,contents,services,initrdBin}
#   lib/systemd-unit-options.nix, lib/systemd-lib.nix  the service submodule and unitNameType
#   modules/system/etc/etc.nix           environment.etc
#   modules/misc/assertions.nix          assertions, warnings
#   modules/system/activation/top-level.nix  system.build, system.checks
#   modules/config/nix.nix, services/system/nix-daemon.nix  nix.enable, nix.optimise.automatic, nix.settings
#   modules/security/misc.nix            security.virtualisation.flushL1DataCache
#   lib/utils.nix                        utils.escapeSystemdPath, utils.fsNeededForBoot (module argument)
{ lib, config, ... }:
let
  inherit (lib) mkOption types;

  # filesystems.nix
  addCheckDesc =
    desc: elemType: check:
    types.addCheck elemType check // { description = "${elemType.description} (with check: ${desc})"; };
  isNonEmpty = s: (builtins.match "[ \t\n]*" s) == null;
  nonEmptyStr = addCheckDesc "non-empty" types.str isNonEmpty;
  nonEmptyWithoutTrailingSlash = addCheckDesc "non-empty without trailing slash" types.str (
    s: isNonEmpty s && (builtins.match ".+/" s) == null
  );
  specialFSTypes = [ "proc" "sysfs" "tmpfs" "ramfs" "devtmpfs" "devpts" ];
  escape = string: builtins.replaceStrings [ " " "\t" ] [ "\\040" "\\011" ] string;

  fileSystemOpts =
    { name, config, ... }:
    {
      options = {
        enable = lib.mkEnableOption "the filesystem mount" // { default = true; };
        mountPoint = mkOption { type = nonEmptyWithoutTrailingSlash; default = name; };
        device = mkOption { type = types.nullOr nonEmptyStr; default = null; };
        fsType = mkOption { type = nonEmptyStr; default = "auto"; };
        options = mkOption { type = types.nonEmptyListOf nonEmptyStr; default = [ "defaults" ]; };
        depends = mkOption { type = types.listOf nonEmptyWithoutTrailingSlash; default = [ ]; };
        label = mkOption { type = types.nullOr nonEmptyStr; default = null; };
        autoFormat = mkOption { type = types.bool; default = false; };
        autoResize = mkOption { type = types.bool; default = false; };
        noCheck = mkOption { type = types.bool; default = false; };
        # stage-1.nix
        neededForBoot = mkOption { type = types.bool; default = false; };
        # overlayfs.nix
        overlay = {
          lowerdir = mkOption {
            type = with types; nullOr (nonEmptyListOf (either str pathInStore));
            default = null;
          };
          upperdir = mkOption { type = types.nullOr types.str; default = null; };
          workdir = mkOption { type = types.nullOr types.str; default = null; };
        };
      };
      # filesystems.nix's own defaults that change what a mount is (the
      # device of special file systems, the one a label names).
      config.device = lib.mkMerge [
        (lib.mkIf (lib.elem config.fsType specialFSTypes) (lib.mkDefault config.fsType))
        (lib.mkIf (config.label != null) (lib.mkDefault "/dev/disk/by-label/${escape config.label}"))
      ];
    };

  # lib/systemd-lib.nix, lib/systemd-unit-options.nix
  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (def: lib.isList def.value) defs' then
        lib.concatMap (def: lib.toList def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };
  unitDeps = mkOption { type = types.listOf unitNameType; default = [ ]; };
  serviceOpts = {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      description = mkOption { type = types.singleLineStr; default = ""; };
      wantedBy = unitDeps;
      requiredBy = unitDeps;
      requires = unitDeps;
      wants = unitDeps;
      after = unitDeps;
      before = unitDeps;
      conflicts = unitDeps;
      unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      serviceConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      script = mkOption { type = types.lines; default = ""; };
    };
  };

  # etc.nix, systemd/initrd.nix (contents)
  fileOpts = {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      text = mkOption { type = types.nullOr types.lines; default = null; };
      source = mkOption { type = types.path; };
    };
  };
in
{
  # Whatever else the modules define (documentation.*, networking.*,
  # systemd.sockets, …) is kept, untyped.
  freeformType = types.lazyAttrsOf types.raw;

  options = {
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; internal = true; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; internal = true; };

    fileSystems = mkOption {
      type = types.attrsOf (types.submodule fileSystemOpts);
      default = { };
      apply = lib.filterAttrs (_: fs: fs.enable);
    };

    boot.kernelParams = mkOption {
      type = types.listOf (types.strMatching ''([^"[:space:]]|"[^"]*")+'');
      default = [ ];
    };
    boot.blacklistedKernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
    boot.postBootCommands = mkOption { type = types.lines; default = ""; };
    boot.loader.grub.enable = mkOption { type = types.bool; default = true; };
    boot.initrd.availableKernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
    boot.initrd.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
    boot.initrd.postMountCommands = mkOption { type = types.lines; default = ""; };
    boot.initrd.extraUtilsCommands = mkOption { type = types.lines; default = ""; };
    boot.initrd.extraUtilsCommandsTest = mkOption { type = types.lines; default = ""; };
    boot.initrd.extraFiles = mkOption {
      type = types.attrsOf (types.submodule { options.source = mkOption { type = types.package; }; });
      default = { };
    };
    boot.initrd.systemd = {
      enable = mkOption { type = types.bool; default = false; };
      package = mkOption { type = types.package; };
      storePaths = mkOption {
        type = types.listOf (types.either types.singleLineStr types.package);
        default = [ ];
      };
      contents = mkOption { type = types.attrsOf (types.submodule fileOpts); default = { }; };
      initrdBin = mkOption { type = types.listOf types.package; default = [ ]; };
      services = mkOption { type = types.attrsOf (types.submodule serviceOpts); default = { }; };
    };

    systemd.services = mkOption { type = types.attrsOf (types.submodule serviceOpts); default = { }; };
    # set by microvm.nix's system.nix and mounts.nix; the options the
    # modules do not touch are kept untyped (freeform)
    systemd.sockets = mkOption {
      type = types.attrsOf (types.submodule {
        freeformType = types.attrsOf types.anything;
        options.enable = mkOption { type = types.bool; default = true; };
      });
      default = { };
    };
    systemd.generators = mkOption { type = types.attrsOf types.path; default = { }; };
    systemd.mounts = mkOption {
      type = types.listOf (types.submodule { freeformType = types.attrsOf types.anything; });
      default = [ ];
    };

    environment.etc = mkOption { type = types.attrsOf (types.submodule fileOpts); default = { }; };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };

    system.build = mkOption {
      type = types.submoduleWith {
        modules = [ { freeformType = with types; lazyAttrsOf (uniq unspecified); } ];
      };
      default = { };
    };
    system.checks = mkOption { type = types.listOf types.package; default = [ ]; };

    nix.enable = mkOption { type = types.bool; default = true; };
    nix.optimise.automatic = mkOption { type = types.bool; default = false; };
    nix.settings = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf types.anything;
        options.auto-optimise-store = mkOption { type = types.bool; default = false; };
      };
      default = { };
    };

    security.virtualisation.flushL1DataCache = mkOption {
      type = types.nullOr (types.enum [ "never" "cond" "always" ]);
      default = null;
    };

    networking.hostName = mkOption { type = types.str; default = "nixos"; };
  };

  config = {
    _module.args = {
      pkgs = import ./stub-pkgs.nix { inherit lib; };
      # lib/utils.nix (the two functions the modules use)
      utils = {
        escapeSystemdPath =
          s:
          let
            replacePrefix =
              p: r: s:
              (if (lib.hasPrefix p s) then r + (lib.removePrefix p s) else s);
            trim = s: lib.removeSuffix "/" (lib.removePrefix "/" s);
            normalizedPath = lib.strings.normalizePath s;
          in
          lib.replaceStrings [ "/" ] [ "-" ] (
            replacePrefix "." (lib.strings.escapeC [ "." ] ".") (
              lib.strings.escapeC (lib.stringToCharacters " !\"#$%&'()*+,;<=>=@[\\]^`{|}~-") (
                if normalizedPath == "/" then normalizedPath else trim normalizedPath
              )
            )
          );
        pathsNeededForBoot = [ "/" "/nix" "/nix/store" "/var" "/var/log" "/var/lib" "/var/lib/nixos" "/etc" "/usr" ];
        fsNeededForBoot = fs: fs.neededForBoot || lib.elem fs.mountPoint config._module.args.utils.pathsNeededForBoot;
      };
    };
    boot.initrd.systemd.package = config._module.args.pkgs.systemd;
    system.build.toplevel = config._module.args.pkgs.fakeDrv "nixos-system-microvm" { };
  };
}
