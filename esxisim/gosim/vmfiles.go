package main

// vmfiles.go: creating a VM's files as ESXi writes them, (re)reading them
// (register/reload) and rewriting .vmx/.vmsd/descriptors from the in-memory state.

import (
	"fmt"
	"hash/fnv"
	"math/rand"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/vmware/govmomi/vim25/types"
)

func diskBaseName(vmName string, i int) string {
	if i == 0 {
		return vmName + ".vmdk"
	}
	return fmt.Sprintf("%s_%d.vmdk", vmName, i)
}

func extentName(desc string, delta bool) string {
	b := strings.TrimSuffix(desc, ".vmdk")
	if delta {
		return b + "-sesparse.vmdk"
	}
	return b + "-flat.vmdk"
}

func unitForIndex(i int) int {
	if i >= 7 {
		return i + 1 // unit 7 is the controller
	}
	return i
}

func nameSeed(s string) int64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(s))
	return int64(h.Sum64() & 0x7fffffffffffffff)
}

// createVMFiles writes the files of a VM from sim.json and returns the .vmx path.
// An existing .vmx is kept as is (restart on an existing state directory).
func (h *Host) createVMFiles(vc VMConfig) (string, error) {
	ds := h.dsByName(vc.Datastore)
	if ds == nil {
		return "", fmt.Errorf("vm %q: unknown datastore %q", vc.Name, vc.Datastore)
	}
	base := escapeFileName(vc.Name)
	dir := filepath.Join(ds.Path, base)
	vmxPath := filepath.Join(dir, base+".vmx")
	if fileExists(vmxPath) {
		return vmxPath, nil
	}
	if err := os.MkdirAll(dir, 0755); err != nil {
		return "", err
	}
	hw := vc.HWVersion
	if hw == 0 {
		hw = 14
	}
	mem := vc.MemoryMB
	if mem == 0 {
		mem = 1024
	}
	cpus := vc.CPUs
	if cpus == 0 {
		cpus = 1
	}
	guest := vc.GuestID
	if guest == "" {
		guest = "otherLinux64Guest"
	}
	bios := randBytes(16)
	bios[0], bios[1] = 0x56, 0x4d
	vcu := randBytes(16)
	vcu[0] = 0x52
	mac := fmt.Sprintf("00:0c:29:%02x:%02x:%02x", bios[13], bios[14], bios[15])

	v := NewVMX()
	v.Set(".encoding", "UTF-8")
	v.Set("config.version", "8")
	v.Set("virtualHW.version", strconv.Itoa(hw))
	v.Set("vmci0.present", "TRUE")
	v.Set("floppy0.present", "FALSE")
	v.Set("numvcpus", strconv.Itoa(cpus))
	v.Set("memSize", strconv.Itoa(mem))
	v.Set("bios.bootRetry.delay", "10")
	v.Set("sched.cpu.units", "mhz")
	v.Set("powerType.powerOff", "default")
	v.Set("powerType.suspend", "soft")
	v.Set("powerType.reset", "default")
	v.Set("tools.upgrade.policy", "manual")
	v.Set("scsi0.virtualDev", "pvscsi")
	v.Set("scsi0.present", "TRUE")
	for i := range vc.Disks {
		node := fmt.Sprintf("scsi0:%d", unitForIndex(i))
		v.Set(node+".deviceType", "scsi-hardDisk")
		v.Set(node+".fileName", diskBaseName(base, i))
		v.Set(node+".present", "TRUE")
		if vc.CBT {
			v.Set(node+".ctkEnabled", "TRUE")
		}
	}
	v.Set("ethernet0.virtualDev", "vmxnet3")
	v.Set("ethernet0.networkName", "VM Network")
	v.Set("ethernet0.addressType", "generated")
	v.Set("ethernet0.wakeOnPcktRcv", "FALSE")
	v.Set("ethernet0.uptCompatibility", "TRUE")
	v.Set("ethernet0.present", "TRUE")
	v.Set("displayName", vc.Name)
	v.Set("guestOS", guestOSFromID(guest))
	v.Set("toolScripts.afterPowerOn", "TRUE")
	v.Set("toolScripts.afterResume", "TRUE")
	v.Set("toolScripts.beforeSuspend", "TRUE")
	v.Set("toolScripts.beforePowerOff", "TRUE")
	v.Set("tools.syncTime", "FALSE")
	if vc.Annotation != "" {
		v.Set("annotation", vc.Annotation)
	}
	v.Set("uuid.bios", spacedUUID(bios))
	v.Set("uuid.location", spacedUUID(bios))
	v.Set("vc.uuid", spacedUUID(vcu))
	v.Set("nvram", base+".nvram")
	v.Set("pciBridge0.present", "TRUE")
	v.Set("svga.present", "TRUE")
	v.Set("ethernet0.generatedAddress", mac)
	v.Set("ethernet0.generatedAddressOffset", "0")
	v.Set("sched.swap.derivedName", filepath.Join("/vmfs/volumes", ds.UUID, base, base+"-"+fmt.Sprintf("%x", bios[12:16])+".vswp"))
	if vc.CBT {
		v.Set("ctkEnabled", "TRUE")
	}
	v.Set("cleanShutdown", "TRUE")
	v.Set("softPowerOff", "FALSE")

	// disks
	for i, dc := range vc.Disks {
		name := diskBaseName(base, i)
		size := dc.Size
		if dc.Image != nil && *dc.Image != "" {
			st, err := os.Stat(*dc.Image)
			if err != nil {
				return "", fmt.Errorf("vm %q disk %d: %v", vc.Name, i, err)
			}
			size = (st.Size() + mib - 1) / mib * mib
		}
		if size <= 0 {
			size = 64 * mib
		}
		size = (size + 511) / 512 * 512
		ext := extentName(name, false)
		extPath := filepath.Join(dir, ext)
		if dc.Image != nil && *dc.Image != "" {
			if err := copyImage(*dc.Image, extPath, size); err != nil {
				return "", err
			}
		} else {
			if err := createSparse(extPath, size); err != nil {
				return "", err
			}
			if dc.Fill > 0 {
				rng := rand.New(rand.NewSource(dc.Seed))
				runs := genRuns(rng, size, int64(dc.Fill*float64(size)), 64*kib, mib, 4*kib)
				if err := writeRuns(extPath, runs, dc.Seed); err != nil {
					return "", err
				}
			}
		}
		thin := true
		if dc.Thin != nil {
			thin = *dc.Thin
		}
		f := &DFile{Dir: dir, Desc: name, Extent: ext, CID: newCID(), DDB: NewVMX()}
		f.LongID = newLongID(f.CID)
		f.DDB.Set("ddb.adapterType", "lsilogic")
		cyl := size / (255 * 63 * 512)
		if cyl < 1 {
			cyl = 1
		}
		f.DDB.Set("ddb.geometry.cylinders", strconv.FormatInt(cyl, 10))
		f.DDB.Set("ddb.geometry.heads", "255")
		f.DDB.Set("ddb.geometry.sectors", "63")
		if thin {
			f.DDB.Set("ddb.thinProvisioned", "1")
		}
		f.DDB.Set("ddb.uuid", newDDBUUID())
		f.DDB.Set("ddb.virtualHWVersion", strconv.Itoa(hw))
		if err := writeDescriptorFile(f, size); err != nil {
			return "", err
		}
	}

	// nvram, vmsd, log
	nv := make([]byte, 8*kib)
	newPRNG(nameSeed(vc.Name)).fill(nv)
	if err := os.WriteFile(filepath.Join(dir, base+".nvram"), nv, 0644); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, base+".vmsd"), []byte(".encoding = \"UTF-8\"\n"), 0644); err != nil {
		return "", err
	}
	logLine := fmt.Sprintf("%s| vmx| I005: Log for VMware ESX pid=%d version=7.0.3 build=build-20328353 option=Release\n",
		time.Now().UTC().Format("2006-01-02T15:04:05.000Z"), os.Getpid())
	if err := os.WriteFile(filepath.Join(dir, "vmware.log"), []byte(logLine), 0644); err != nil {
		return "", err
	}
	if err := writeFileAtomic(vmxPath, v.Bytes(), 0755); err != nil {
		return "", err
	}
	return vmxPath, nil
}

// vmfsPath maps a real path to the host's "/vmfs/volumes/<ds>/..." name (set by
// the Host at start; identity until then).
var vmfsPath = func(p string) string { return p }

// writeDescriptorFile writes f's descriptor from its fields.
func writeDescriptorFile(f *DFile, capacity int64) error {
	d := &Descriptor{Version: 1, CID: f.CID, ParentCID: 0xffffffff, DDB: f.DDB}
	if d.DDB == nil {
		d.DDB = NewVMX()
	}
	if f.LongID == "" {
		f.LongID = newLongID(f.CID)
	}
	d.DDB.Set("ddb.longContentID", f.LongID)
	if f.Delta {
		d.CreateType = "seSparse"
		d.Extents = []Extent{{"RW", capacity / 512, "SESPARSE", f.Extent}}
		d.DDB.Set("ddb.grain", "8")
	} else {
		d.CreateType = "vmfs"
		d.Extents = []Extent{{"RW", capacity / 512, "VMFS", f.Extent}}
	}
	if f.Parent != nil {
		d.ParentCID = f.Parent.CID
		if f.Parent.Dir == f.Dir {
			d.ParentHint = f.Parent.Desc
		} else {
			d.ParentHint = vmfsPath(f.Parent.DescPath())
		}
	}
	if f.Ctk != "" {
		d.ChangeTrackPath = f.Ctk
	}
	return writeFileAtomic(f.DescPath(), d.Bytes(), 0600)
}

func (vm *VM) writeDescriptor(d *Disk, f *DFile) {
	if err := writeDescriptorFile(f, d.Capacity); err != nil {
		logf("vm %s: write descriptor %s: %v", vm.ID, f.Desc, err)
	}
}

// relFileName gives the .vmx fileName for a disk file.
func (vm *VM) relFileName(f *DFile) string {
	if f.Dir == vm.Dir {
		return f.Desc
	}
	if ds, rel := vm.h.dsForPath(f.DescPath()); ds != nil {
		return "/vmfs/volumes/" + ds.Name + "/" + rel
	}
	return f.DescPath()
}

// writeVmx rewrites the .vmx from the in-memory state.
func (vm *VM) writeVmx() {
	v := vm.vmx
	v.Set("displayName", vm.Name)
	v.Set("memSize", strconv.Itoa(vm.MemMB))
	v.Set("numvcpus", strconv.Itoa(vm.CPUs))
	v.Set("guestOS", guestOSFromID(vm.GuestID))
	if vm.Annotation != "" {
		v.Set("annotation", vm.Annotation)
	} else {
		v.Del("annotation")
	}
	if vm.CtkVM {
		v.Set("ctkEnabled", "TRUE")
	} else if v.Has("ctkEnabled") {
		v.Set("ctkEnabled", "FALSE")
	}
	for _, d := range vm.Disks {
		node := d.Node()
		v.Set(node+".fileName", vm.relFileName(d.Top))
		if d.CtkKey {
			v.Set(node+".ctkEnabled", "TRUE")
		} else if v.Has(node + ".ctkEnabled") {
			v.Set(node+".ctkEnabled", "FALSE")
		}
	}
	if err := writeFileAtomic(vm.VmxPath, v.Bytes(), 0755); err != nil {
		logf("vm %s: write vmx: %v", vm.ID, err)
	}
	if st, err := os.Stat(vm.VmxPath); err == nil {
		vm.vmxMod = st.ModTime()
	}
}

func (vm *VM) vmsdPath() string {
	return strings.TrimSuffix(vm.VmxPath, ".vmx") + ".vmsd"
}

// writeVmsd rewrites the .vmsd (snapshot tree) from the in-memory state.
func (vm *VM) writeVmsd() {
	v := NewVMX()
	v.Set(".encoding", "UTF-8")
	snaps := vm.allSnaps()
	if vm.LastUID > 0 {
		v.Set("snapshot.lastUID", strconv.Itoa(vm.LastUID))
	}
	if vm.Current != nil {
		v.Set("snapshot.current", strconv.Itoa(vm.Current.UID))
	}
	for i, s := range snaps {
		p := fmt.Sprintf("snapshot%d", i)
		v.Set(p+".uid", strconv.Itoa(s.UID))
		v.Set(p+".filename", s.Vmsn)
		if s.Parent != nil {
			v.Set(p+".parent", strconv.Itoa(s.Parent.UID))
		}
		v.Set(p+".displayName", s.Name)
		if s.Desc != "" {
			v.Set(p+".description", s.Desc)
		}
		if s.Memory {
			v.Set(p+".type", "1")
		}
		us := s.Created.UnixNano() / 1000
		v.Set(p+".createTimeHigh", strconv.FormatInt(us>>32, 10))
		v.Set(p+".createTimeLow", strconv.FormatInt(int64(int32(uint32(us))), 10))
		n := 0
		for _, d := range vm.Disks {
			f := s.Frozen[d.Key]
			if f == nil {
				continue
			}
			v.Set(fmt.Sprintf("%s.disk%d.fileName", p, n), vm.relFileName(f))
			v.Set(fmt.Sprintf("%s.disk%d.node", p, n), d.Node())
			n++
		}
		v.Set(p+".numDisks", strconv.Itoa(n))
	}
	if len(snaps) > 0 {
		v.Set("snapshot.numSnapshots", strconv.Itoa(len(snaps)))
	}
	if err := writeFileAtomic(vm.vmsdPath(), v.Bytes(), 0644); err != nil {
		logf("vm %s: write vmsd: %v", vm.ID, err)
	}
}

// ---------------------------------------------------------------------------
// reading

var diskKeyRe = regexp.MustCompile(`^scsi(\d+):(\d+)\.filename$`)

// loadChain reads a descriptor and its parents into d.Files, returning the file.
func (h *Host) loadChain(d *Disk, dir, name string, depth int) (*DFile, *OpFault) {
	if depth > 256 {
		return nil, opFault(&types.FileFault{File: name}, "Disk chain too deep")
	}
	path := name
	if !filepath.IsAbs(name) {
		path = filepath.Join(dir, name)
	} else if strings.HasPrefix(name, "/vmfs/volumes/") {
		p, f := h.resolvePath(name)
		if f != nil {
			return nil, f
		}
		path = p
	}
	fdir, fname := filepath.Dir(path), filepath.Base(path)
	if x := d.findFile(fdir, fname); x != nil {
		return x, nil
	}
	desc, err := ReadDescriptor(path)
	if err != nil {
		dp := h.dsPath(path)
		if os.IsNotExist(err) {
			return nil, opFault(&types.FileNotFound{FileFault: types.FileFault{File: dp}}, "File %s was not found", dp)
		}
		return nil, opFault(&types.FileFault{File: dp}, "Error caused by file %s", dp)
	}
	f := &DFile{Dir: fdir, Desc: fname, Extent: desc.Extents[0].File, CID: desc.CID, DDB: desc.DDB}
	f.LongID = desc.DDB.Get("ddb.longContentID")
	ct := strings.ToLower(desc.CreateType)
	f.Delta = desc.ParentHint != "" || strings.Contains(ct, "sparse")
	if desc.ChangeTrackPath != "" && fileExists(filepath.Join(fdir, desc.ChangeTrackPath)) {
		f.Ctk = desc.ChangeTrackPath
	}
	d.Files = append(d.Files, f)
	if desc.ParentHint != "" {
		p, fault := h.loadChain(d, fdir, desc.ParentHint, depth+1)
		if fault != nil {
			return nil, fault
		}
		f.Parent = p
	}
	if d.Capacity == 0 {
		d.Capacity = desc.Capacity()
	}
	return f, nil
}

// parseVM reads a .vmx (+ descriptors + .vmsd) into a new, unregistered VM.
func (h *Host) parseVM(vmxPath, name string) (*VM, *OpFault) {
	v, err := ReadVMX(vmxPath)
	if err != nil {
		dp := h.dsPath(vmxPath)
		if os.IsNotExist(err) {
			return nil, opFault(&types.NotFound{}, "The object or item referred to could not be found.")
		}
		return nil, opFault(&types.FileFault{File: dp}, "Error caused by file %s", dp)
	}
	ds, _ := h.dsForPath(vmxPath)
	if ds == nil {
		return nil, opFault(&types.InvalidDatastorePath{DatastorePath: vmxPath}, "Invalid datastore path '%s'.", vmxPath)
	}
	vm := &VM{h: h, DS: ds, Dir: filepath.Dir(vmxPath), VmxPath: vmxPath, vmx: v,
		Power: types.VirtualMachinePowerStatePoweredOff}
	if st, err := os.Stat(vmxPath); err == nil {
		vm.vmxMod = st.ModTime()
	}
	if fault := vm.applyVmx(v, name); fault != nil {
		return nil, fault
	}
	if fault := vm.loadVmsd(); fault != nil {
		return nil, fault
	}
	return vm, nil
}

// applyVmx takes the identity, hardware and disks from a parsed .vmx.
func (vm *VM) applyVmx(v *VMX, name string) *OpFault {
	h := vm.h
	vm.vmx = v
	vm.Name = v.Get("displayName")
	if name != "" {
		vm.Name = name
	}
	if vm.Name == "" {
		vm.Name = strings.TrimSuffix(filepath.Base(vm.VmxPath), ".vmx")
	}
	vm.GuestID = guestIDFromOS(v.Get("guestOS"))
	vm.HW, _ = strconv.Atoi(v.Get("virtualHW.version"))
	if vm.HW == 0 {
		vm.HW = 4
	}
	vm.MemMB, _ = strconv.Atoi(v.Get("memSize"))
	if vm.MemMB == 0 {
		vm.MemMB = 32
	}
	vm.CPUs, _ = strconv.Atoi(v.Get("numvcpus"))
	if vm.CPUs == 0 {
		vm.CPUs = 1
	}
	vm.Annotation = v.Get("annotation")
	if b := parseSpacedUUID(v.Get("uuid.bios")); b != nil {
		vm.BiosUUID = stdUUID(b)
	} else {
		vm.BiosUUID = stdUUID(randBytes(16))
	}
	if b := parseSpacedUUID(v.Get("vc.uuid")); b != nil {
		vm.InstUUID = stdUUID(b)
	} else {
		vm.InstUUID = stdUUID(randBytes(16))
	}
	vm.MAC = v.Get("ethernet0.generatedAddress")
	if vm.MAC == "" {
		vm.MAC = v.Get("ethernet0.address")
	}
	vm.CtkVM = v.Bool("ctkEnabled")

	type node struct{ ctrl, unit int }
	var nodes []node
	for _, k := range v.Keys() {
		m := diskKeyRe.FindStringSubmatch(strings.ToLower(k))
		if m == nil {
			continue
		}
		c, _ := strconv.Atoi(m[1])
		u, _ := strconv.Atoi(m[2])
		p := fmt.Sprintf("scsi%d:%d", c, u)
		if v.Has(p+".present") && !v.Bool(p+".present") {
			continue
		}
		dt := strings.ToLower(v.Get(p + ".deviceType"))
		if strings.Contains(dt, "cdrom") || !strings.HasSuffix(strings.ToLower(v.Get(k)), ".vmdk") {
			continue
		}
		nodes = append(nodes, node{c, u})
	}
	sort.Slice(nodes, func(i, j int) bool {
		if nodes[i].ctrl != nodes[j].ctrl {
			return nodes[i].ctrl < nodes[j].ctrl
		}
		return nodes[i].unit < nodes[j].unit
	})
	var disks []*Disk
	for _, n := range nodes {
		p := fmt.Sprintf("scsi%d:%d", n.ctrl, n.unit)
		d := &Disk{Ctrl: n.ctrl, Unit: n.unit, Key: int32(2000 + 16*n.ctrl + n.unit)}
		// keep the tracking state of an unchanged disk across a reload
		var old *Disk
		for _, od := range vm.Disks {
			if od.Key == d.Key {
				old = od
			}
		}
		top, fault := h.loadChain(d, vm.Dir, v.Get(p+".fileName"), 0)
		if fault != nil {
			return fault
		}
		d.Top = top
		base := d.Base()
		d.Thin = base.DDB.Get("ddb.thinProvisioned") == "1"
		d.DDBUUID = base.DDB.Get("ddb.uuid")
		if d.DDBUUID == "" {
			d.DDBUUID = newDDBUUID()
			base.DDB.Set("ddb.uuid", d.DDBUUID)
		}
		d.CtkKey = v.Bool(p + ".ctkEnabled")
		on := vm.CtkVM && d.CtkKey
		switch {
		case on && old != nil && old.Track != nil:
			d.Track = old.Track // reload keeps the active tracking
		case on:
			d.Pending = true // activates at the next stun point
		case old != nil:
			// ctk keys switched off: tracking is forgotten, ctk files removed
			vm.deactivateCBT(d)
		}
		disks = append(disks, d)
	}
	vm.Disks = disks
	if !vm.CtkVM {
		for _, d := range vm.Disks {
			d.Pending = false
		}
	}
	return nil
}

// loadVmsd reads the snapshot tree from the .vmsd.
func (vm *VM) loadVmsd() *OpFault {
	v, err := ReadVMX(vm.vmsdPath())
	vm.Roots, vm.Current = nil, nil
	if err != nil {
		return nil // no .vmsd: no snapshots
	}
	vm.LastUID, _ = strconv.Atoi(v.Get("snapshot.lastUID"))
	re := regexp.MustCompile(`^snapshot(\d+)\.uid$`)
	byUID := map[int]*Snap{}
	parents := map[int]int{}
	var order []int
	for _, k := range v.Keys() {
		m := re.FindStringSubmatch(strings.ToLower(k))
		if m == nil {
			continue
		}
		p := "snapshot" + m[1]
		uid, _ := strconv.Atoi(v.Get(k))
		if uid == 0 {
			continue
		}
		s := &Snap{UID: uid, Name: v.Get(p + ".displayName"), Desc: v.Get(p + ".description"),
			Vmsn: v.Get(p + ".filename"), Frozen: map[int32]*DFile{}, Cbt: map[int32]snapCbt{},
			State: types.VirtualMachinePowerStatePoweredOff}
		hi, _ := strconv.ParseInt(v.Get(p+".createTimeHigh"), 10, 64)
		lo, _ := strconv.ParseInt(v.Get(p+".createTimeLow"), 10, 64)
		us := hi<<32 | int64(uint32(lo))
		s.Created = time.Unix(0, us*1000)
		vmem := strings.TrimSuffix(s.Vmsn, ".vmsn") + ".vmem"
		if v.Get(p+".type") == "1" || fileExists(filepath.Join(vm.Dir, vmem)) {
			s.Memory = true
			s.Vmem = vmem
			s.State = types.VirtualMachinePowerStatePoweredOn
		}
		nd, _ := strconv.Atoi(v.Get(p + ".numDisks"))
		for i := 0; i < nd; i++ {
			fn := v.Get(fmt.Sprintf("%s.disk%d.fileName", p, i))
			node := strings.ToLower(v.Get(fmt.Sprintf("%s.disk%d.node", p, i)))
			for _, d := range vm.Disks {
				if d.Node() == node {
					f, fault := vm.h.loadChain(d, vm.Dir, fn, 0)
					if fault != nil {
						return fault
					}
					s.Frozen[d.Key] = f
				}
			}
		}
		if pu, err := strconv.Atoi(v.Get(p + ".parent")); err == nil {
			parents[uid] = pu
		}
		byUID[uid] = s
		order = append(order, uid)
		if uid > vm.LastUID {
			vm.LastUID = uid
		}
	}
	for _, uid := range order {
		s := byUID[uid]
		if p, ok := byUID[parents[uid]]; ok && parents[uid] != uid {
			s.Parent = p
			p.Children = append(p.Children, s)
		} else {
			vm.Roots = append(vm.Roots, s)
		}
	}
	if cur, err := strconv.Atoi(v.Get("snapshot.current")); err == nil {
		vm.Current = byUID[cur]
	}
	return nil
}
