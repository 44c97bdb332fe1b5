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
  # no mount point: attached all the same (swap, or a disk for a service)
  swapVolume = {
    image = "swap.img";
    mountPoint = null;
    size = 256;
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
  # the same with the systemd initrd
  no-takeover-systemd.module = guest {
    boot.initrd.systemd.enable = true;
    boot.initrd.guest-agent.takeOverMounts = false;
  };
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

  # microvm.nix gives every volume a drive letter (withDriveLetters), with a
  # mount point or not: a volume without one before the others moves their
  # letters on
  letters-shared.module = guest (
    { lib, ... }:
    {
      microvm.volumes = lib.mkForce [
        swapVolume
        rwVolume
        scratchVolume
        (scratchVolume // { image = "cache.img"; mountPoint = "/var/cache"; fsType = "xfs"; })
      ];
    }
  );
  # (mkOverride 10: over onDisk's mkForce)
  letters-disk.module = onDisk (
    { lib, ... }:
    {
      boot.initrd.systemd.enable = true;
      microvm.volumes = lib.mkOverride 10 [
        swapVolume
        (rwVolume // { label = "rw-store"; })
        swapVolume
        scratchVolume
      ];
    }
  );
  # squashfs store disk: /dev/vda, the volumes from vdb
  letters-squashfs.module = onDisk (
    { lib, ... }:
    {
      security.virtualisation.flushL1DataCache = "always";
      microvm.volumes = lib.mkOverride 10 [
        swapVolume
        scratchVolume
        (rwVolume // { label = "rw-store"; })
      ];
    }
  );
  # the store on a disk without an overlay: stage 1 mounts it at /nix/store,
  # the volumes still start at vdb
  letters-disk-no-overlay.module = onDisk (
    { lib, ... }:
    {
      microvm.writableStoreOverlay = lib.mkForce null;
      microvm.volumes = lib.mkOverride 10 [
        swapVolume
        scratchVolume
      ];
    }
  );
  # autoFormat volumes: the initrd carries the mkfs tools for their fsType
  format-scripted.module = guest {
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
      {
        serial = "logs";
        mountPoint = "/var/log/big";
        fsType = "xfs";
        autoFormat = true;
      }
    ];
  };
  format-systemd.module = guest {
    boot.initrd.systemd.enable = true;
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
  fail-autoformat-no-tool = {
    fails = true;
    module = guest {
      boot.initrd.guest-agent.volumes = [
        {
          serial = "data";
          mountPoint = "/data";
          autoFormat = true;
        }
      ];
    };
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
