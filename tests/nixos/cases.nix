# The configurations tests/unit/test_nixos_eval.py evaluates (eval.nix).
# Each case: `module` (a NixOS module), `microvm` (whether microvm.nix's
# guest modules are imported; default true), `fails` (evaluation must fail
# with the module's message).
let
  roStore9p = {
    proto = "9p";
    tag = "ro-store";
    source = "/nix/store";
    mountPoint = "/nix/.ro-store";
  };
  homeVirtiofs = {
    proto = "virtiofs";
    tag = "home";
    source = "/var/lib/microvms/guest/home";
    mountPoint = "/home";
  };
  rwVolume = {
    image = "nix-store-overlay.img";
    label = "nix-store";
    mountPoint = "/nix/.rw-store";
    size = 2048;
  };
  # no label: microvm.nix mounts it by its drive letter
  scratchVolume = {
    image = "scratch.img";
    mountPoint = "/scratch";
    fsType = "ext4";
    size = 512;
  };
  guest =
    extra:
    {
      imports = [ extra ];
      networking.hostName = "guest";
      microvm = {
        hypervisor = "qemu";
        shares = [
          roStore9p
          homeVirtiofs
        ];
        volumes = [
          rwVolume
          scratchVolume
        ];
        writableStoreOverlay = "/nix/.rw-store";
      };
      boot.initrd.guest-agent = {
        enable = true;
        fromMicrovm = true;
      };
    };
  onDisk =
    extra:
    guest (
      { lib, ... }:
      {
        imports = [ extra ];
        microvm.shares = lib.mkForce [ homeVirtiofs ];
        # the store disk is labelled nix-store (erofs): another label here
        microvm.volumes = lib.mkForce [
          (rwVolume // { label = "rw-store"; })
          scratchVolume
        ];
      }
    );
in
{
  # 9p ro-store, virtiofs share, ext4 volumes, writableStoreOverlay; scripted stage 1
  share-scripted.module = guest { };
  # the same with the systemd initrd
  share-systemd.module = guest { boot.initrd.systemd.enable = true; };
  # the same, stage 1 left to mount what microvm.nix declares
  share-no-takeover.module = guest { boot.initrd.guest-agent.takeOverMounts = false; };
  # the store as an erofs disk (storeOnDisk: no /nix/store share)
  disk-erofs-scripted.module = onDisk { };
  disk-erofs-systemd.module = onDisk { boot.initrd.systemd.enable = true; };
  # squashfs store disk (what store-disk.nix picks with flushL1DataCache = "always")
  disk-squashfs.module = onDisk { security.virtualisation.flushL1DataCache = "always"; };
  # no overlay: microvm.nix bind-mounts the host store share on /nix/store
  share-no-overlay.module = guest (
    { lib, ... }:
    {
      microvm.writableStoreOverlay = lib.mkForce null;
    }
  );
  # a volume of the agent's own, which microvm.nix does not declare: no
  # fileSystems entry is made for it
  extra-volume.module = guest {
    boot.initrd.guest-agent.volumes = [
      {
        label = "nix-store";
        mountPoint = "/nix/.rw-store";
        fsType = "ext4";
      }
      {
        serial = "data";
        mountPoint = "/data";
        fsType = "ext4";
        autoFormat = true;
      }
    ];
  };
  # the reset and failure policies
  policies-scripted.module = guest {
    boot.initrd.guest-agent.resetPolicy = "every-boot";
    boot.initrd.guest-agent.onFailure = "shell";
  };
  policies-systemd.module = guest {
    boot.initrd.systemd.enable = true;
    boot.initrd.guest-agent.resetPolicy = "every-boot";
    boot.initrd.guest-agent.onFailure = "shell";
  };
  # x-nix-db
  nixdb.module = guest { boot.initrd.guest-agent.nixDatabase = true; };
  nixdb-disk.module = onDisk {
    boot.initrd.systemd.enable = true;
    boot.initrd.guest-agent.nixDatabase = true;
  };
  # without microvm.nix: options set by hand
  manual = {
    microvm = false;
    module = {
      fileSystems."/" = {
        device = "rootfs";
        fsType = "tmpfs";
      };
      boot.initrd.guest-agent = {
        enable = true;
        shares = [
          {
            tag = "ro-store";
            mountPoint = "/nix/.ro-store";
            readOnly = true;
          }
        ];
        volumes = [
          {
            label = "nix-store";
            mountPoint = "/nix/.rw-store";
            fsType = "ext4";
          }
        ];
        writableStoreOverlay = "/nix/.rw-store";
      };
    };
  };

  # ---- wrong configurations: evaluation fails with the module's message
  fail-9p-upper = {
    fails = true;
    module = guest (
      { lib, ... }:
      {
        microvm.shares = lib.mkForce [
          roStore9p
          {
            proto = "9p";
            tag = "rw-store";
            source = "/var/lib/microvms/guest/rw";
            mountPoint = "/nix/.rw-store";
          }
        ];
        microvm.volumes = lib.mkForce [ ];
      }
    );
  };
  fail-tag-twice = {
    fails = true;
    module = guest (
      { lib, ... }:
      {
        microvm.shares = lib.mkForce [
          roStore9p
          (homeVirtiofs // { tag = "ro-store"; })
        ];
      }
    );
  };
  fail-mount-point-twice = {
    fails = true;
    module = guest {
      boot.initrd.guest-agent.volumes = [
        {
          label = "nix-store";
          mountPoint = "/home";
          fsType = "ext4";
        }
      ];
    };
  };
  fail-no-microvm = {
    fails = true;
    microvm = false;
    module = {
      boot.initrd.guest-agent = {
        enable = true;
        fromMicrovm = true;
      };
    };
  };
  fail-nixdb-register-closure = {
    fails = true;
    module = guest {
      boot.initrd.guest-agent.nixDatabase = true;
      microvm.registerClosure = true;
    };
  };
  fail-nixdb-no-overlay = {
    fails = true;
    module = guest (
      { lib, ... }:
      {
        boot.initrd.guest-agent.nixDatabase = true;
        microvm.writableStoreOverlay = lib.mkForce null;
      }
    );
  };
  fail-nixdb-no-nix = {
    fails = true;
    module = guest {
      boot.initrd.guest-agent.nixDatabase = true;
      nix.enable = false;
    };
  };
}
