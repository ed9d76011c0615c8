package main

// model.go: the vcsim (govmomi simulator) side. Builds the ESX model with our
// datastores, registers VirtualMachine objects with numeric ids, and pushes the
// hostops state into the model (syncModel) with Map.WithLock + Map.Update.

import (
	"context"
	"crypto/sha1"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/simulator/esx"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

var guestFullNames = map[string]string{
	"otherLinux64Guest":      "Other Linux (64-bit)",
	"otherLinuxGuest":        "Other Linux (32-bit)",
	"otherGuest":             "Other (32-bit)",
	"otherGuest64":           "Other (64-bit)",
	"other64Guest":           "Other (64-bit)",
	"ubuntu64Guest":          "Ubuntu Linux (64-bit)",
	"debian10_64Guest":       "Debian GNU/Linux 10 (64-bit)",
	"debian11_64Guest":       "Debian GNU/Linux 11 (64-bit)",
	"centos7_64Guest":        "CentOS 7 (64-bit)",
	"centos8_64Guest":        "CentOS 8 (64-bit)",
	"rhel8_64Guest":          "Red Hat Enterprise Linux 8 (64-bit)",
	"windows9_64Guest":       "Microsoft Windows 10 (64-bit)",
	"windows2019srv_64Guest": "Microsoft Windows Server 2019 (64-bit)",
}

func guestFullName(id string) string {
	if n, ok := guestFullNames[id]; ok {
		return n
	}
	return id
}

// buildModel creates the vcsim ESX model, our datastores and the license info.
func (h *Host) buildModel() error {
	m := simulator.ESX()
	m.Datastore = 0
	m.Machine = 0
	m.Autostart = false
	m.ServiceContent.About = aboutInfo()
	if err := m.Create(); err != nil {
		return err
	}
	h.model = m
	ctx := context.Background()
	c, err := vim25.NewClient(ctx, m.Service)
	if err != nil {
		return err
	}
	h.client = c

	Map := simulator.Map
	hs := Map.Any("HostSystem").(*simulator.HostSystem)
	h.refs.host = hs.Self
	dc := Map.Any("Datacenter").(*simulator.Datacenter)
	h.refs.dc = dc.Self
	h.refs.vmFolder = dc.VmFolder
	h.refs.pool = esx.ResourcePool.Self
	if len(dc.Network) > 0 {
		h.refs.network = dc.Network[0]
	}
	if cr := Map.Get(*hs.Parent); cr != nil {
		f := reflect.ValueOf(cr).Elem().FieldByName("EnvironmentBrowser")
		if f.IsValid() {
			if ref, ok := f.Interface().(*types.ManagedObjectReference); ok && ref != nil {
				h.refs.envBrowser = *ref
			}
		}
	}
	about := aboutInfo()
	hs.Name = h.cfg.Name
	hs.Summary.Config.Name = h.cfg.Name
	hs.Summary.Config.Product = &about
	if hs.Config != nil {
		hs.Config.Product = about
	}
	// the ESX template lists a datastore that does not exist in this model
	dc.Datastore = nil

	host := object.NewHostSystem(c, hs.Reference())
	dss, err := host.ConfigManager().DatastoreSystem(ctx)
	if err != nil {
		return err
	}
	for _, dc := range h.cfg.Datastores {
		if err := os.MkdirAll(dc.Path, 0755); err != nil {
			return err
		}
		dsObj, err := dss.CreateLocalDatastore(ctx, dc.Name, dc.Path)
		if err != nil {
			return fmt.Errorf("datastore %s: %v", dc.Name, err)
		}
		ds := &DS{Name: dc.Name, Path: dc.Path, Capacity: dc.Capacity}
		ref := dsObj.Reference()
		b := sha1.Sum([]byte("esxisim/" + h.cfg.Name + "/" + dc.Name))
		ds.UUID = fmt.Sprintf("%x-%x-%x-%x", b[0:4], b[4:8], b[8:10], b[10:16])
		obj := Map.Get(ref).(*simulator.Datastore)
		newRef := types.ManagedObjectReference{Type: "Datastore", Value: ds.UUID}
		h.rekey(obj, ref, newRef, dss.Reference(), obj.Browser)
		ds.Ref = newRef
		ds.obj = obj
		if ds.Capacity <= 0 {
			ds.Capacity = 200 * gib
		}
		obj.Summary.Type = "VMFS"
		obj.Info = &types.VmfsDatastoreInfo{
			DatastoreInfo: types.DatastoreInfo{
				Name:                   ds.Name,
				Url:                    ds.Path,
				FreeSpace:              ds.Capacity,
				MaxFileSize:            62 * 1024 * gib,
				MaxVirtualDiskCapacity: 62 * 1024 * gib,
				MaxMemoryFileSize:      62 * 1024 * gib,
				ContainerId:            ds.UUID,
			},
			MaxPhysicalRDMFileSize: 62 * 1024 * gib,
			MaxVirtualRDMFileSize:  62 * 1024 * gib,
			Vmfs: &types.HostVmfsVolume{
				HostFileSystemVolume: types.HostFileSystemVolume{Type: "VMFS", Name: ds.Name, Capacity: ds.Capacity},
				BlockSizeMb:          1,
				BlockSize:            1024,
				UnmapGranularity:     1024,
				UnmapPriority:        "low",
				MaxBlocks:            63963136,
				MajorVersion:         6,
				Version:              "6.82",
				Uuid:                 ds.UUID,
				Extent:               []types.HostScsiDiskPartition{{DiskName: "mpx.vmhba0:C0:T0:L0", Partition: 3}},
				VmfsUpgradable:       false,
				Local:                types.NewBool(true),
				Ssd:                  types.NewBool(true),
			},
		}
		h.dss = append(h.dss, ds)
		h.refreshDatastore(ds)
	}

	// licenses
	lm := Map.Get(*Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance).Content.LicenseManager).(*simulator.LicenseManager)
	lm.Licenses = []types.LicenseManagerLicenseInfo{h.licenseInfo()}
	return nil
}

func aboutInfo() types.AboutInfo {
	a := esx.ServiceContent.About
	a.FullName = esxiVer.FullName
	a.Version = esxiVer.Version
	a.Build = esxiVer.Build
	a.ApiVersion = esxiVer.APIVersion
	a.LicenseProductVersion = esxiVer.LicenseVersion
	return a
}

func (h *Host) licenseInfo() types.LicenseManagerLicenseInfo {
	props := func(kv ...string) []types.KeyAnyValue {
		var out []types.KeyAnyValue
		for i := 0; i+1 < len(kv); i += 2 {
			out = append(out, types.KeyAnyValue{Key: kv[i], Value: kv[i+1]})
		}
		return out
	}
	v := esxiVer
	if h.free() {
		return types.LicenseManagerLicenseInfo{
			LicenseKey: "0J02H-XXXXX-XXXXX-XXXXX-XXXXX",
			EditionKey: v.FreeKey,
			Name:       v.FreeName,
			Total:      0,
			Used:       2,
			CostUnit:   v.CostUnit,
			Properties: props("ProductName", "VMware ESX Server", "ProductVersion", v.LicenseVersion,
				"count_disabled", "This license is unlimited", "feature", "maxRAM:0"),
		}
	}
	return types.LicenseManagerLicenseInfo{
		LicenseKey: "4N4XH-XXXXX-XXXXX-XXXXX-XXXXX",
		EditionKey: v.LicensedKey,
		Name:       v.LicensedName,
		Total:      0,
		Used:       2,
		CostUnit:   v.CostUnit,
		Properties: props("ProductName", "VMware ESX Server", "ProductVersion", v.LicenseVersion,
			"count_disabled", "This license is unlimited", "feature", "vmotion:VMware vMotion"),
	}
}

func (h *Host) free() bool { return !strings.EqualFold(h.cfg.License, "licensed") }

// rekey gives a registered object a new moref, fixing every reference to it.
func (h *Host) rekey(obj mo.Reference, old, ref types.ManagedObjectReference, extra ...types.ManagedObjectReference) {
	Map := simulator.Map
	Map.Remove(old)
	var roots []interface{}
	for _, e := range Map.All("") {
		roots = append(roots, e)
	}
	for _, r := range extra {
		if o := Map.Get(r); o != nil {
			roots = append(roots, o)
		}
	}
	roots = append(roots, obj)
	seen := map[seenKey]bool{}
	for _, r := range roots {
		replaceRefs(reflect.ValueOf(r), old, ref, seen)
	}
	Map.Put(obj)
}

var morefType = reflect.TypeOf(types.ManagedObjectReference{})

// seenKey identifies a visited pointer; the type is part of the key because a
// pointer to a struct's first field has the struct's address.
type seenKey struct {
	p uintptr
	t reflect.Type
}

func replaceRefs(v reflect.Value, old, ref types.ManagedObjectReference, seen map[seenKey]bool) {
	switch v.Kind() {
	case reflect.Ptr:
		if v.IsNil() {
			return
		}
		k := seenKey{v.Pointer(), v.Type()}
		if seen[k] {
			return
		}
		seen[k] = true
		replaceRefs(v.Elem(), old, ref, seen)
	case reflect.Interface:
		if !v.IsNil() {
			e := v.Elem()
			if e.Kind() == reflect.Ptr {
				replaceRefs(e, old, ref, seen)
			}
		}
	case reflect.Slice:
		for i := 0; i < v.Len(); i++ {
			replaceRefs(v.Index(i), old, ref, seen)
		}
	case reflect.Struct:
		if v.Type() == morefType {
			if v.CanSet() && v.Interface().(types.ManagedObjectReference) == old {
				v.Set(reflect.ValueOf(ref))
			}
			return
		}
		for i := 0; i < v.NumField(); i++ {
			if v.Type().Field(i).PkgPath != "" {
				continue
			}
			replaceRefs(v.Field(i), old, ref, seen)
		}
	}
}

// ---------------------------------------------------------------------------
// VM objects

func (h *Host) registerObject(vm *VM) {
	Map := simulator.Map
	obj := &simulator.VirtualMachine{}
	obj.Self = types.ManagedObjectReference{Type: "VirtualMachine", Value: vm.ID}
	obj.Name = vm.Name
	host := h.refs.host
	pool := h.refs.pool
	obj.ResourcePool = &pool
	obj.Runtime.Host = &host
	obj.EnvironmentBrowser = h.refs.envBrowser
	obj.Datastore = []types.ManagedObjectReference{vm.DS.Ref}
	if h.refs.network.Value != "" {
		obj.Network = []types.ManagedObjectReference{h.refs.network}
	}
	obj.Capability = types.VirtualMachineCapability{
		SnapshotOperationsSupported:      true,
		MultipleSnapshotsSupported:       true,
		SnapshotConfigSupported:          true,
		PoweredOffSnapshotsSupported:     true,
		MemorySnapshotsSupported:         true,
		RevertToSnapshotSupported:        true,
		QuiescedSnapshotsSupported:       true,
		DisableSnapshotsSupported:        false,
		LockSnapshotsSupported:           false,
		ConsolePreferencesSupported:      false,
		CpuFeatureMaskSupported:          true,
		S1AcpiManagementSupported:        true,
		SettingScreenResolutionSupported: true,
		ToolsAutoUpdateSupported:         true,
		VmNpivWwnSupported:               true,
		NpivWwnOnNonRdmVmSupported:       true,
		SwapPlacementSupported:           true,
		ToolsSyncTimeSupported:           true,
		VirtualMmuUsageSupported:         true,
		DiskSharesSupported:              true,
		BootOptionsSupported:             true,
		SettingVideoRamSizeSupported:     true,
		ChangeTrackingSupported:          types.NewBool(true),
		MultipleCoresPerSocketSupported:  types.NewBool(true),
		HostBasedReplicationSupported:    types.NewBool(true),
		GuestAutoLockSupported:           types.NewBool(true),
		MemoryReservationLockSupported:   types.NewBool(true),
		SecureBootSupported:              types.NewBool(true),
		SeSparseDiskSupported:            types.NewBool(true),
	}
	obj.ConfigStatus = types.ManagedEntityStatusGreen
	obj.OverallStatus = types.ManagedEntityStatusGreen

	devs := object.VirtualDeviceList(deepCopy(esx.VirtualDevice).([]types.BaseVirtualDevice))
	unit := int32(7)
	nic := &types.VirtualVmxnet3{VirtualVmxnet: types.VirtualVmxnet{VirtualEthernetCard: types.VirtualEthernetCard{
		VirtualDevice: types.VirtualDevice{
			Key:        4000,
			DeviceInfo: &types.Description{Label: "Network adapter 1", Summary: "VM Network"},
			Backing: &types.VirtualEthernetCardNetworkBackingInfo{
				VirtualDeviceDeviceBackingInfo: types.VirtualDeviceDeviceBackingInfo{DeviceName: "VM Network"},
				Network:                        &h.refs.network,
			},
			Connectable: &types.VirtualDeviceConnectInfo{StartConnected: true, AllowGuestControl: true,
				Connected: vm.Power == types.VirtualMachinePowerStatePoweredOn, Status: "ok"},
			ControllerKey: 100,
			UnitNumber:    &unit,
		},
		AddressType:      "generated",
		MacAddress:       vm.MAC,
		WakeOnLanEnabled: types.NewBool(true),
	}}}
	devs = append(devs, nic)

	rspec := types.DefaultResourceConfigSpec()
	obj.Config = &types.VirtualMachineConfigInfo{
		Template:            false,
		Firmware:            "bios",
		Hardware:            types.VirtualHardware{NumCPU: int32(vm.CPUs), NumCoresPerSocket: 1, MemoryMB: int32(vm.MemMB), Device: devs},
		ExtraConfig:         []types.BaseOptionValue{&types.OptionValue{Key: "nvram", Value: strings.TrimSuffix(vm.vmxBase(), ".vmx") + ".nvram"}},
		Tools:               &types.ToolsConfigInfo{ToolsVersion: 11333, AfterPowerOn: types.NewBool(true), AfterResume: types.NewBool(true), BeforeGuestStandby: types.NewBool(true), BeforeGuestShutdown: types.NewBool(true), SyncTimeWithHost: types.NewBool(false), ToolsUpgradePolicy: "manual"},
		Flags:               types.VirtualMachineFlagInfo{SnapshotPowerOffBehavior: "powerOff", CbrcCacheEnabled: types.NewBool(false)},
		DefaultPowerOps:     types.VirtualMachineDefaultPowerOpInfo{PowerOffType: "soft", SuspendType: "hard", ResetType: "soft", DefaultPowerOffType: "soft", DefaultSuspendType: "hard", DefaultResetType: "soft", StandbyAction: "checkpoint"},
		CpuAllocation:       &rspec.CpuAllocation,
		MemoryAllocation:    &rspec.MemoryAllocation,
		LatencySensitivity:  &types.LatencySensitivity{Level: types.LatencySensitivitySensitivityLevelNormal},
		BootOptions:         &types.VirtualMachineBootOptions{BootDelay: 0, EnterBIOSSetup: types.NewBool(false), BootRetryEnabled: types.NewBool(false), BootRetryDelay: 10000},
		SwapPlacement:       "inherit",
		CpuHotAddEnabled:    types.NewBool(false),
		MemoryHotAddEnabled: types.NewBool(false),
	}
	vm.obj = obj

	folder := Map.Get(h.refs.vmFolder).(*simulator.Folder)
	Map.WithLock(folder, func() {
		folder.ChildEntity = append(folder.ChildEntity, obj.Self)
		Map.PutEntity(folder, obj)
	})
	vm.syncModel()
	if hs, ok := Map.Get(h.refs.host).(*simulator.HostSystem); ok {
		Map.AppendReference(hs, &hs.Vm, obj.Self)
	}
	if rp, ok := Map.Get(h.refs.pool).(*simulator.ResourcePool); ok {
		Map.AppendReference(rp, &rp.Vm, obj.Self)
	}
	if vm.DS.obj != nil {
		Map.AppendReference(vm.DS.obj, &vm.DS.obj.Vm, obj.Self)
	}
}

func (h *Host) unregisterObject(vm *VM) {
	Map := simulator.Map
	for _, s := range vm.allSnaps() {
		if s.obj != nil {
			Map.Remove(s.Ref)
		}
	}
	ref := vm.obj.Self
	Map.Remove(ref)
	folder := Map.Get(h.refs.vmFolder).(*simulator.Folder)
	Map.WithLock(folder, func() {
		children := append([]types.ManagedObjectReference(nil), folder.ChildEntity...)
		simulator.RemoveReference(&children, ref)
		folder.ChildEntity = children
	})
	if hs, ok := Map.Get(h.refs.host).(*simulator.HostSystem); ok {
		Map.RemoveReference(hs, &hs.Vm, ref)
	}
	if rp, ok := Map.Get(h.refs.pool).(*simulator.ResourcePool); ok {
		Map.RemoveReference(rp, &rp.Vm, ref)
	}
	if vm.DS.obj != nil {
		Map.RemoveReference(vm.DS.obj, &vm.DS.obj.Vm, ref)
	}
}

func stdFromSpaced(s string) string {
	if b := parseSpacedUUID(s); b != nil {
		return stdUUID(b)
	}
	return s
}

func commaNum(n int64) string {
	s := strconv.FormatInt(n, 10)
	var out []byte
	for i := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	return string(out)
}

func (vm *VM) backingFor(d *Disk, f *DFile, changeID string) *types.VirtualDiskFlatVer2BackingInfo {
	thin := d.Thin
	b := &types.VirtualDiskFlatVer2BackingInfo{
		VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{FileName: vm.h.dsPath(f.DescPath())},
		DiskMode:                     "persistent",
		Split:                        types.NewBool(false),
		WriteThrough:                 types.NewBool(false),
		ThinProvisioned:              &thin,
		EagerlyScrub:                 types.NewBool(false),
		Uuid:                         strings.Replace(strings.ToLower(stdFromSpaced(d.DDBUUID)), "6000c29", "6000C29", 1),
		ContentId:                    f.LongID,
		ChangeId:                     changeID,
		DigestEnabled:                types.NewBool(false),
		Sharing:                      "sharingNone",
	}
	if ds, _ := vm.h.dsForPath(f.DescPath()); ds != nil {
		ref := ds.Ref
		b.Datastore = &ref
	}
	if f.Delta {
		b.DeltaDiskFormat = "seSparseFormat"
		b.DeltaGrainSize = 4
	}
	if f.Parent != nil {
		b.Parent = vm.backingFor(d, f.Parent, "")
	}
	return b
}

// deviceList builds the device list: the non-disk devices of the current model
// config, SCSI controllers and one VirtualDisk per disk. snap != nil builds the
// frozen view of that snapshot.
func (vm *VM) deviceList(base []types.BaseVirtualDevice, snap *Snap) []types.BaseVirtualDevice {
	var out []types.BaseVirtualDevice
	for _, dv := range base {
		switch dv.(type) {
		case *types.VirtualDisk, *types.ParaVirtualSCSIController:
			continue
		}
		out = append(out, deepCopy(dv).(types.BaseVirtualDevice))
	}
	ctrls := map[int][]int32{0: nil}
	var disks []types.BaseVirtualDevice
	for i, d := range vm.Disks {
		top, cid := d.Top, ""
		if snap != nil {
			f := snap.Frozen[d.Key]
			if f == nil {
				continue
			}
			top = f
			if c, ok := snap.Cbt[d.Key]; ok && c.ID != "" {
				cid = fmt.Sprintf("%s/%d", c.ID, c.Seq)
			}
		} else if d.Track != nil {
			cid = d.Track.ChangeID()
		}
		unit := int32(d.Unit)
		yes := types.NewBool(false)
		limit := int64(-1)
		res := int32(0)
		disk := &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key:           d.Key,
				DeviceInfo:    &types.Description{Label: fmt.Sprintf("Hard disk %d", i+1), Summary: commaNum(d.Capacity/1024) + " KB"},
				Backing:       vm.backingFor(d, top, cid),
				ControllerKey: int32(1000 + d.Ctrl),
				UnitNumber:    &unit,
			},
			CapacityInKB:               d.Capacity / 1024,
			CapacityInBytes:            d.Capacity,
			Shares:                     &types.SharesInfo{Shares: 1000, Level: types.SharesLevelNormal},
			StorageIOAllocation:        &types.StorageIOAllocationInfo{Limit: &limit, Shares: &types.SharesInfo{Shares: 1000, Level: types.SharesLevelNormal}, Reservation: &res},
			DiskObjectId:               fmt.Sprintf("%s-%d", vm.ID, d.Key),
			NativeUnmanagedLinkedClone: yes,
		}
		ctrls[d.Ctrl] = append(ctrls[d.Ctrl], d.Key)
		disks = append(disks, disk)
	}
	var cks []int
	for c := range ctrls {
		cks = append(cks, c)
	}
	sort.Ints(cks)
	for _, c := range cks {
		slot := int32(160 + c)
		unit := int32(3 + c)
		out = append(out, &types.ParaVirtualSCSIController{VirtualSCSIController: types.VirtualSCSIController{
			VirtualController: types.VirtualController{
				VirtualDevice: types.VirtualDevice{
					Key:           int32(1000 + c),
					DeviceInfo:    &types.Description{Label: fmt.Sprintf("SCSI controller %d", c), Summary: "VMware paravirtual SCSI"},
					SlotInfo:      &types.VirtualDevicePciBusSlotInfo{PciSlotNumber: slot},
					ControllerKey: 100,
					UnitNumber:    &unit,
				},
				BusNumber: int32(c),
				Device:    ctrls[c],
			},
			HotAddRemove:       types.NewBool(true),
			SharedBus:          types.VirtualSCSISharingNoSharing,
			ScsiCtlrUnitNumber: 7,
		}})
	}
	return append(out, disks...)
}

func (vm *VM) snapTree(list []*Snap) []types.VirtualMachineSnapshotTree {
	var out []types.VirtualMachineSnapshotTree
	for _, s := range list {
		out = append(out, types.VirtualMachineSnapshotTree{
			Snapshot:          s.Ref,
			Vm:                vm.obj.Self,
			Name:              s.Name,
			Description:       s.Desc,
			Id:                int32(s.UID),
			CreateTime:        s.Created,
			State:             s.State,
			Quiesced:          s.Quiesced,
			ChildSnapshotList: vm.snapTree(s.Children),
			ReplaySupported:   types.NewBool(false),
		})
	}
	return out
}

func vmFileType(name string) string {
	ext := filepath.Ext(name)
	b := strings.TrimSuffix(name, ext)
	switch ext {
	case ".vmx":
		return string(types.VirtualMachineFileLayoutExFileTypeConfig)
	case ".vmsd":
		return string(types.VirtualMachineFileLayoutExFileTypeSnapshotList)
	case ".vmsn":
		return string(types.VirtualMachineFileLayoutExFileTypeSnapshotData)
	case ".vmem":
		if strings.Contains(b, "Snapshot") {
			return string(types.VirtualMachineFileLayoutExFileTypeSnapshotMemory)
		}
		return string(types.VirtualMachineFileLayoutExFileTypeSuspendMemory)
	case ".vmss":
		return string(types.VirtualMachineFileLayoutExFileTypeSuspend)
	case ".nvram":
		return string(types.VirtualMachineFileLayoutExFileTypeNvram)
	case ".log":
		return string(types.VirtualMachineFileLayoutExFileTypeLog)
	case ".vswp":
		return string(types.VirtualMachineFileLayoutExFileTypeSwap)
	case ".vmxf":
		return string(types.VirtualMachineFileLayoutExFileTypeExtendedConfig)
	case ".vmdk":
		for _, s := range []string{"-flat", "-delta", "-sesparse", "-ctk", "-rdm", "-rdmp"} {
			if strings.HasSuffix(b, s) {
				return string(types.VirtualMachineFileLayoutExFileTypeDiskExtent)
			}
		}
		return string(types.VirtualMachineFileLayoutExFileTypeDiskDescriptor)
	}
	return ""
}

// layouts builds layout, layoutEx and storage info from the files on disk.
func (vm *VM) layouts() (*types.VirtualMachineFileLayout, *types.VirtualMachineFileLayoutEx, *types.VirtualMachineStorageInfo, *types.VirtualMachineStorageSummary) {
	now := time.Now()
	lx := &types.VirtualMachineFileLayoutEx{Timestamp: now}
	ly := &types.VirtualMachineFileLayout{}
	keys := map[string]int32{}
	var committed int64
	entries, _ := os.ReadDir(vm.Dir)
	for _, e := range entries {
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		t := vmFileType(e.Name())
		if t == "" {
			continue
		}
		full := filepath.Join(vm.Dir, e.Name())
		info, err := e.Info()
		if err != nil {
			continue
		}
		alloc := fileAllocated(full)
		committed += alloc
		key := int32(len(lx.File))
		keys[full] = key
		lx.File = append(lx.File, types.VirtualMachineFileLayoutExFileInfo{
			Key: key, Name: vm.h.dsPath(full), Type: t, Size: info.Size(), UniqueSize: alloc,
			Accessible: types.NewBool(true),
		})
		switch t {
		case "nvram", "snapshotList":
			ly.ConfigFile = append(ly.ConfigFile, e.Name())
		case "log":
			ly.LogFile = append(ly.LogFile, e.Name())
		}
	}
	unit := func(f *DFile) types.VirtualMachineFileLayoutExDiskUnit {
		var u types.VirtualMachineFileLayoutExDiskUnit
		if k, ok := keys[f.DescPath()]; ok {
			u.FileKey = append(u.FileKey, k)
		}
		if k, ok := keys[f.ExtentPath()]; ok {
			u.FileKey = append(u.FileKey, k)
		}
		return u
	}
	var uncommitted int64
	for _, d := range vm.Disks {
		dl := types.VirtualMachineFileLayoutExDiskLayout{Key: d.Key}
		ol := types.VirtualMachineFileLayoutDiskLayout{Key: d.Key}
		chain := d.Top.Chain()
		for _, f := range chain {
			dl.Chain = append(dl.Chain, unit(f))
		}
		for i := len(chain) - 1; i >= 0; i-- {
			ol.DiskFile = append(ol.DiskFile, vm.h.dsPath(chain[i].DescPath()))
		}
		lx.Disk = append(lx.Disk, dl)
		ly.Disk = append(ly.Disk, ol)
		var a int64
		for _, f := range chain {
			a += fileAllocated(f.ExtentPath())
		}
		if d.Capacity > a {
			uncommitted += d.Capacity - a
		}
	}
	for _, s := range vm.allSnaps() {
		sl := types.VirtualMachineFileLayoutExSnapshotLayout{Key: s.Ref, DataKey: -1, MemoryKey: -1}
		if k, ok := keys[filepath.Join(vm.Dir, s.Vmsn)]; ok {
			sl.DataKey = k
		}
		if s.Vmem != "" {
			if k, ok := keys[filepath.Join(vm.Dir, s.Vmem)]; ok {
				sl.MemoryKey = k
			}
		}
		osl := types.VirtualMachineFileLayoutSnapshotLayout{Key: s.Ref, SnapshotFile: []string{vm.h.dsPath(filepath.Join(vm.Dir, s.Vmsn))}}
		for _, d := range vm.Disks {
			f := s.Frozen[d.Key]
			if f == nil {
				continue
			}
			dl := types.VirtualMachineFileLayoutExDiskLayout{Key: d.Key}
			for _, x := range f.Chain() {
				dl.Chain = append(dl.Chain, unit(x))
				osl.SnapshotFile = append(osl.SnapshotFile, vm.h.dsPath(x.DescPath()))
			}
			sl.Disk = append(sl.Disk, dl)
		}
		lx.Snapshot = append(lx.Snapshot, sl)
		ly.Snapshot = append(ly.Snapshot, osl)
	}
	st := &types.VirtualMachineStorageInfo{Timestamp: now, PerDatastoreUsage: []types.VirtualMachineUsageOnDatastore{{
		Datastore: vm.DS.Ref, Committed: committed, Uncommitted: uncommitted, Unshared: committed}}}
	ss := &types.VirtualMachineStorageSummary{Committed: committed, Uncommitted: uncommitted, Unshared: committed, Timestamp: now}
	return ly, lx, st, ss
}

// syncModel pushes the VM state into the vcsim model. Caller holds vm.mu (or the VM
// is not yet visible).
func (vm *VM) syncModel() {
	if vm.obj == nil || vm.removed {
		return
	}
	Map := simulator.Map
	obj := vm.obj
	on := vm.Power == types.VirtualMachinePowerStatePoweredOn
	var prov int64
	for _, d := range vm.Disks {
		prov += d.Capacity
	}
	atomic.StoreInt64(&vm.provisioned, prov)
	ly, lx, st, ss := vm.layouts()
	vmPath := vm.DSPath()
	dir := vm.h.dsPath(vm.Dir)

	Map.WithLock(obj, func() {
		cfg := *obj.Config
		cfg.Name = vm.Name
		cfg.GuestId = vm.GuestID
		cfg.GuestFullName = guestFullName(vm.GuestID)
		cfg.Version = fmt.Sprintf("vmx-%02d", vm.HW)
		cfg.Uuid = vm.BiosUUID
		cfg.InstanceUuid = vm.InstUUID
		cfg.LocationId = vm.BiosUUID
		cfg.Annotation = vm.Annotation
		cfg.ChangeTrackingEnabled = types.NewBool(vm.CtkVM)
		cfg.Files = types.VirtualMachineFileInfo{VmPathName: vmPath, SnapshotDirectory: dir, SuspendDirectory: dir, LogDirectory: dir}
		hw := cfg.Hardware
		hw.NumCPU = int32(vm.CPUs)
		hw.MemoryMB = int32(vm.MemMB)
		hw.Device = vm.deviceList(obj.Config.Hardware.Device, nil)
		cfg.Hardware = hw
		now := time.Now()
		cfg.Modified = now
		cfg.ChangeVersion = now.UTC().Format("2006-01-02T15:04:05.000000Z")

		var boot *time.Time
		if on && vm.BootTime != nil {
			boot = vm.BootTime
		}
		host := vm.h.refs.host
		rt := types.VirtualMachineRuntimeInfo{
			Host: &host, ConnectionState: types.VirtualMachineConnectionStateConnected,
			PowerState: vm.Power, BootTime: boot, FaultToleranceState: "notConfigured",
			MaxCpuUsage: int32(2400 * vm.CPUs), MaxMemoryUsage: int32(vm.MemMB),
			ConsolidationNeeded: types.NewBool(false), OnlineStandby: types.NewBool(false),
			Paused: types.NewBool(false), CleanPowerOff: types.NewBool(!on),
			SnapshotInBackground: types.NewBool(false), QuiescedForkParent: types.NewBool(false),
			InstantCloneFrozen: types.NewBool(false), CryptoState: "unlocked",
		}
		toolsStatus := types.VirtualMachineToolsStatusToolsNotRunning
		toolsRun := string(types.VirtualMachineToolsRunningStatusGuestToolsNotRunning)
		guestState := "notRunning"
		hb := types.ManagedEntityStatusGray
		if on {
			toolsStatus = types.VirtualMachineToolsStatusToolsOk
			toolsRun = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
			guestState = "running"
			hb = types.ManagedEntityStatusGreen
		}
		guest := &types.GuestInfo{
			ToolsStatus: toolsStatus, ToolsVersionStatus: "guestToolsCurrent", ToolsVersionStatus2: "guestToolsCurrent",
			ToolsRunningStatus: toolsRun, ToolsVersion: "11333", GuestId: vm.GuestID, GuestFamily: "linuxGuest",
			GuestFullName: guestFullName(vm.GuestID), GuestState: guestState, AppHeartbeatStatus: "appStatusGray",
			GuestOperationsReady: types.NewBool(on), InteractiveGuestOperationsReady: types.NewBool(false),
			GuestStateChangeSupported: types.NewBool(on),
		}
		if on {
			guest.HostName = strings.ToLower(strings.Map(func(r rune) rune {
				if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' {
					return r
				}
				return '-'
			}, vm.Name))
		}
		var uptime int32
		if on && vm.BootTime != nil {
			uptime = int32(time.Since(*vm.BootTime).Seconds())
		}
		summary := types.VirtualMachineSummary{
			Vm:      &obj.Self,
			Runtime: rt,
			Guest: &types.VirtualMachineGuestSummary{GuestId: vm.GuestID, GuestFullName: guestFullName(vm.GuestID),
				ToolsStatus: toolsStatus, ToolsVersionStatus: "guestToolsCurrent", ToolsVersionStatus2: "guestToolsCurrent",
				ToolsRunningStatus: toolsRun, HostName: guest.HostName},
			Config: types.VirtualMachineConfigSummary{
				Name: vm.Name, Template: false, VmPathName: vmPath, MemorySizeMB: int32(vm.MemMB),
				NumCpu: int32(vm.CPUs), NumEthernetCards: 1, NumVirtualDisks: int32(len(vm.Disks)),
				Uuid: vm.BiosUUID, InstanceUuid: vm.InstUUID, GuestId: vm.GuestID,
				GuestFullName: guestFullName(vm.GuestID), Annotation: vm.Annotation,
				InstallBootRequired: types.NewBool(false), TpmPresent: types.NewBool(false),
				HwVersion: fmt.Sprintf("vmx-%02d", vm.HW),
			},
			Storage:       ss,
			QuickStats:    types.VirtualMachineQuickStats{GuestHeartbeatStatus: hb, UptimeSeconds: uptime},
			OverallStatus: types.ManagedEntityStatusGreen,
		}

		changes := []types.PropertyChange{
			{Name: "name", Val: vm.Name},
			{Name: "config", Val: &cfg},
			{Name: "config.hardware.device", Val: hw.Device},
			{Name: "config.changeTrackingEnabled", Val: vm.CtkVM},
			{Name: "config.name", Val: vm.Name},
			{Name: "config.files.vmPathName", Val: vmPath},
			{Name: "runtime", Val: rt},
			{Name: "runtime.powerState", Val: vm.Power},
			{Name: "summary", Val: summary},
			{Name: "summary.runtime.powerState", Val: vm.Power},
			{Name: "summary.config.name", Val: vm.Name},
			{Name: "summary.config.vmPathName", Val: vmPath},
			{Name: "guest", Val: guest},
			{Name: "layout", Val: ly},
			{Name: "layoutEx", Val: lx},
			{Name: "storage", Val: st},
			{Name: "datastore", Val: []types.ManagedObjectReference{vm.DS.Ref}},
		}
		var roots []types.ManagedObjectReference
		for _, s := range vm.Roots {
			roots = append(roots, s.Ref)
		}
		if len(vm.Roots) > 0 {
			info := &types.VirtualMachineSnapshotInfo{RootSnapshotList: vm.snapTree(vm.Roots)}
			if vm.Current != nil {
				cur := vm.Current.Ref
				info.CurrentSnapshot = &cur
			}
			changes = append(changes,
				types.PropertyChange{Name: "snapshot", Val: info},
				types.PropertyChange{Name: "rootSnapshot", Val: roots})
		} else {
			changes = append(changes,
				types.PropertyChange{Name: "snapshot", Val: nil},
				types.PropertyChange{Name: "rootSnapshot", Val: nil})
		}
		Map.Update(obj, changes)
	})

	// snapshot objects: children and frozen devices
	for _, s := range vm.allSnaps() {
		if s.obj == nil {
			vm.newSnapObject(s)
			continue
		}
		var kids []types.ManagedObjectReference
		for _, c := range s.Children {
			kids = append(kids, c.Ref)
		}
		devs := vm.deviceList(s.obj.Config.Hardware.Device, s)
		so := s.obj
		Map.WithLock(so, func() {
			Map.Update(so, []types.PropertyChange{
				{Name: "childSnapshot", Val: kids},
				{Name: "config.hardware.device", Val: devs},
			})
		})
	}
}

// newSnapObject registers the VirtualMachineSnapshot object for s with a deep copy
// of the VM's config and the frozen device backings.
func (vm *VM) newSnapObject(s *Snap) {
	so := &simulator.VirtualMachineSnapshot{}
	so.Self = s.Ref
	so.Vm = vm.obj.Self
	var cfg types.VirtualMachineConfigInfo
	simulator.Map.WithLock(vm.obj, func() {
		cfg = *(deepCopy(vm.obj.Config).(*types.VirtualMachineConfigInfo))
	})
	cfg.Hardware.Device = vm.deviceList(cfg.Hardware.Device, s)
	so.Config = cfg
	for _, c := range s.Children {
		so.ChildSnapshot = append(so.ChildSnapshot, c.Ref)
	}
	s.obj = so
	simulator.Map.Put(so)
}
