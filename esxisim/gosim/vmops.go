package main

// vmops.go: snapshot, power, guest-write, register/reload/unregister/destroy
// operations (the hostops layer proper).

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	poweredOn  = types.VirtualMachinePowerStatePoweredOn
	poweredOff = types.VirtualMachinePowerStatePoweredOff
	suspended  = types.VirtualMachinePowerStateSuspended
)

func (vm *VM) lock() *OpFault {
	vm.mu.Lock()
	if vm.removed {
		vm.mu.Unlock()
		return vmNotFound(vm.ID)
	}
	return nil
}

// commit writes .vmx/.vmsd, pushes the model and refreshes the datastore.
func (vm *VM) commit() {
	vm.writeVmx()
	vm.writeVmsd()
	vm.syncModel()
	vm.h.refreshDatastore(vm.DS)
}

// ---------------------------------------------------------------------------
// disks

// newDelta puts a fresh seSparse delta on top of d.
func (vm *VM) newDelta(d *Disk) error {
	base := strings.TrimSuffix(d.Base().Desc, ".vmdk")
	var desc string
	for n := 1; ; n++ {
		desc = fmt.Sprintf("%s-%06d.vmdk", base, n)
		ext := extentName(desc, true)
		if !fileExists(filepath.Join(vm.Dir, desc)) && !fileExists(filepath.Join(vm.Dir, ext)) && d.findFile(vm.Dir, desc) == nil {
			break
		}
	}
	f := &DFile{Dir: vm.Dir, Desc: desc, Extent: extentName(desc, true), Parent: d.Top, CID: newCID(), Delta: true, DDB: NewVMX()}
	f.LongID = newLongID(f.CID)
	if err := createSparse(f.ExtentPath(), d.Capacity); err != nil {
		return err
	}
	if d.Track != nil {
		writeCtk(f, d.Track, d.Capacity)
	}
	if err := writeDescriptorFile(f, d.Capacity); err != nil {
		return err
	}
	d.Files = append(d.Files, f)
	d.Top = f
	return nil
}

func (vm *VM) deleteFile(d *Disk, f *DFile) {
	_ = os.Remove(f.DescPath())
	_ = os.Remove(f.ExtentPath())
	if f.Ctk != "" {
		_ = os.Remove(f.DiskCtkPath())
	}
	d.removeFile(f)
}

// mergeInto copies the allocated ranges of child c into its parent p, and p takes
// c's place in the tree (c's children, snapshots freezing c, the top).
func (vm *VM) mergeInto(d *Disk, c, p *DFile) error {
	rs, err := dataRanges(c.ExtentPath())
	if err != nil {
		return err
	}
	if err := copyRanges(c.ExtentPath(), p.ExtentPath(), rs); err != nil {
		return err
	}
	var kids []*DFile
	for _, x := range d.Files {
		if x.Parent == c {
			x.Parent = p
			kids = append(kids, x)
		}
	}
	for _, s := range vm.allSnaps() {
		if s.Frozen[d.Key] == c {
			s.Frozen[d.Key] = p
		}
	}
	if d.Top == c {
		d.Top = p
	}
	vm.deleteFile(d, c)
	p.CID = newCID()
	p.LongID = newLongID(p.CID)
	if d.Track != nil && d.Top == p {
		writeCtk(p, d.Track, d.Capacity)
	}
	vm.writeDescriptor(d, p)
	for _, k := range kids {
		vm.writeDescriptor(d, k)
	}
	return nil
}

// ---------------------------------------------------------------------------
// snapshots

func (h *Host) snapshotNeed(vm *VM) int64 {
	var caps int64
	for _, d := range vm.Disks {
		caps += d.Capacity
	}
	return gib + caps/20
}

// CreateSnapshot takes a snapshot: every disk gets a new delta on top of its current
// top, which becomes the file frozen by the snapshot.
func (vm *VM) CreateSnapshot(name, desc string, memory, quiesce bool) (*Snap, *OpFault) {
	if f := vm.lock(); f != nil {
		return nil, f
	}
	defer vm.mu.Unlock()
	h := vm.h
	h.mu.Lock()
	fail := h.snapshotFail
	h.mu.Unlock()
	if fail {
		return nil, opFault(&types.GenericVmConfigFault{Reason: "An error occurred while saving the snapshot: Injected failure."},
			"An error occurred while saving the snapshot: Injected failure.")
	}
	if free, need := h.dsFree(vm.DS), h.snapshotNeed(vm); free < need {
		return nil, opFault(&types.NoDiskSpace{FileFault: types.FileFault{File: h.dsPath(vm.Dir)}, Datastore: vm.DS.Name},
			"There is not enough space on the file system for the selected operation.")
	}
	on := vm.Power == poweredOn
	if on {
		vm.activateCBT() // stun point
	} else {
		memory, quiesce = false, false
	}
	uid := vm.LastUID + 1
	base := strings.TrimSuffix(vm.vmxBase(), ".vmx")
	s := &Snap{UID: uid, Name: name, Desc: desc, Created: time.Now(), State: vm.Power, Memory: memory,
		Quiesced: quiesce, Frozen: map[int32]*DFile{}, Cbt: map[int32]snapCbt{},
		Vmsn: fmt.Sprintf("%s-Snapshot%d.vmsn", base, uid),
		Ref:  types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: fmt.Sprintf("%s-snapshot-%d", vm.ID, uid)}}
	if !memory && s.State == poweredOn {
		s.State = poweredOff
	}
	for _, d := range vm.Disks {
		frozen := d.Top
		if err := vm.newDelta(d); err != nil {
			return nil, opFault(&types.FileFault{File: h.dsPath(vm.Dir)}, "An error occurred while saving the snapshot: %v", err)
		}
		s.Frozen[d.Key] = frozen
		if d.Track != nil {
			d.Track.Seq++
			s.Cbt[d.Key] = snapCbt{ID: d.Track.ID, Seq: d.Track.Seq}
			writeCtk(d.Top, d.Track, d.Capacity)
		}
	}
	_ = os.WriteFile(filepath.Join(vm.Dir, s.Vmsn), vm.vmx.Bytes(), 0644)
	if memory {
		s.Vmem = fmt.Sprintf("%s-Snapshot%d.vmem", base, uid)
		_ = createSparse(filepath.Join(vm.Dir, s.Vmem), int64(vm.MemMB)*mib)
	}
	if vm.Current != nil {
		s.Parent = vm.Current
		vm.Current.Children = append(vm.Current.Children, s)
	} else {
		vm.Roots = append(vm.Roots, s)
	}
	vm.Current = s
	vm.LastUID = uid
	vm.commit()
	logf("vm %s (%s): snapshot %d %q created", vm.ID, vm.Name, uid, name)
	return s, nil
}

func (vm *VM) detachSnap(s *Snap) {
	// s's children take its place among its siblings (the roots when s has no parent).
	siblings := &vm.Roots
	if s.Parent != nil {
		siblings = &s.Parent.Children
	}
	var kept []*Snap
	for _, c := range *siblings {
		if c != s {
			kept = append(kept, c)
		}
	}
	for _, c := range s.Children {
		c.Parent = s.Parent
		kept = append(kept, c)
	}
	*siblings = kept
	if vm.Current == s {
		vm.Current = s.Parent
	}
	if s.obj != nil {
		simulator.Map.Remove(s.Ref)
		s.obj = nil
	}
	_ = os.Remove(filepath.Join(vm.Dir, s.Vmsn))
	if s.Vmem != "" {
		_ = os.Remove(filepath.Join(vm.Dir, s.Vmem))
	}
}

// removeOne consolidates one snapshot: the delta made at the snapshot (the only
// child of its frozen file) is merged into the frozen file.
func (vm *VM) removeOne(s *Snap) *OpFault {
	for _, d := range vm.Disks {
		f := s.Frozen[d.Key]
		if f == nil {
			continue
		}
		kids := d.children(f)
		if len(kids) == 1 {
			if err := vm.mergeInto(d, kids[0], f); err != nil {
				return opFault(&types.FileFault{File: vm.h.dsPath(f.DescPath())}, "Consolidation failed: %v", err)
			}
		}
	}
	vm.detachSnap(s)
	vm.prune()
	return nil
}

// prune deletes delta files nothing refers to any more: no child, not the top,
// not frozen by a snapshot (branches left behind by revert).
func (vm *VM) prune() {
	for _, d := range vm.Disks {
		for changed := true; changed; {
			changed = false
			for _, f := range append([]*DFile(nil), d.Files...) {
				if f.Delta && f != d.Top && len(d.children(f)) == 0 && !vm.frozenByAny(d, f) {
					vm.deleteFile(d, f)
					changed = true
				}
			}
		}
	}
}

func (vm *VM) RemoveSnapshot(s *Snap, removeChildren bool) *OpFault {
	if f := vm.lock(); f != nil {
		return f
	}
	defer vm.mu.Unlock()
	if vm.snapByUID(s.UID) != s {
		return opFault(&types.NotFound{}, "The object or item referred to could not be found.")
	}
	var targets []*Snap
	var post func(*Snap)
	post = func(x *Snap) {
		for _, c := range x.Children {
			post(c)
		}
		targets = append(targets, x)
	}
	if removeChildren {
		post(s)
	} else {
		targets = []*Snap{s}
	}
	var fault *OpFault
	for _, t := range targets {
		if fault = vm.removeOne(t); fault != nil {
			break
		}
	}
	if vm.Power == poweredOn {
		vm.activateCBT()
	}
	vm.commit()
	logf("vm %s (%s): snapshot %d removed (children=%v)", vm.ID, vm.Name, s.UID, removeChildren)
	return fault
}

func (vm *VM) RemoveAllSnapshots() *OpFault {
	if f := vm.lock(); f != nil {
		return f
	}
	defer vm.mu.Unlock()
	for _, d := range vm.Disks {
		chain := d.Top.Chain()
		base := chain[0]
		for _, f := range chain[1:] {
			rs, err := dataRanges(f.ExtentPath())
			if err == nil {
				err = copyRanges(f.ExtentPath(), base.ExtentPath(), rs)
			}
			if err != nil {
				return opFault(&types.FileFault{File: vm.h.dsPath(f.DescPath())}, "Consolidation failed: %v", err)
			}
		}
		for _, f := range append([]*DFile(nil), d.Files...) {
			if f != base {
				vm.deleteFile(d, f)
			}
		}
		d.Top = base
		if len(chain) > 1 {
			base.CID = newCID()
			base.LongID = newLongID(base.CID)
		}
		if d.Track != nil {
			writeCtk(base, d.Track, d.Capacity)
		}
		vm.writeDescriptor(d, base)
	}
	for _, s := range vm.allSnaps() {
		if s.obj != nil {
			simulator.Map.Remove(s.Ref)
			s.obj = nil
		}
		_ = os.Remove(filepath.Join(vm.Dir, s.Vmsn))
		if s.Vmem != "" {
			_ = os.Remove(filepath.Join(vm.Dir, s.Vmem))
		}
	}
	vm.Roots, vm.Current = nil, nil
	if vm.Power == poweredOn {
		vm.activateCBT()
	}
	vm.commit()
	logf("vm %s (%s): all snapshots removed", vm.ID, vm.Name)
	return nil
}

func (vm *VM) frozenByAny(d *Disk, f *DFile) bool {
	for _, s := range vm.allSnaps() {
		if s.Frozen[d.Key] == f {
			return true
		}
	}
	return false
}

// Revert discards the current delta, puts a fresh delta on the snapshot's frozen
// files and gives active CBT a new tracking id.
func (vm *VM) Revert(s *Snap, suppressPowerOn bool) *OpFault {
	if f := vm.lock(); f != nil {
		return f
	}
	defer vm.mu.Unlock()
	if vm.snapByUID(s.UID) != s {
		return opFault(&types.NotFound{}, "The object or item referred to could not be found.")
	}
	for _, d := range vm.Disks {
		f := s.Frozen[d.Key]
		if f == nil {
			continue
		}
		old := d.Top
		if old.Delta && len(d.children(old)) == 0 && !vm.frozenByAny(d, old) {
			vm.deleteFile(d, old)
		}
		d.Top = f
		if d.Track != nil {
			d.Track = newTracking()
		}
		if err := vm.newDelta(d); err != nil {
			return opFault(&types.FileFault{File: vm.h.dsPath(vm.Dir)}, "Revert failed: %v", err)
		}
	}
	vm.Current = s
	switch {
	case s.Memory && s.State == poweredOn && !suppressPowerOn:
		vm.Power = poweredOn
		now := time.Now()
		vm.BootTime = &now
	case s.State == suspended:
		vm.Power = suspended
	default:
		vm.Power = poweredOff
	}
	vm.commit()
	logf("vm %s (%s): reverted to snapshot %d", vm.ID, vm.Name, s.UID)
	return nil
}

// ---------------------------------------------------------------------------
// power

func (vm *VM) vmxChanged() bool {
	st, err := os.Stat(vm.VmxPath)
	return err == nil && !st.ModTime().Equal(vm.vmxMod)
}

func (vm *VM) PowerOn() *OpFault {
	if f := vm.lock(); f != nil {
		return f
	}
	defer vm.mu.Unlock()
	if vm.Power == poweredOn {
		return invalidPowerState(poweredOn, vm.Power)
	}
	vm.h.mu.Lock()
	fail := vm.h.powerOnFail
	vm.h.mu.Unlock()
	if fail {
		// the fault a host gives when the VM's monitor cannot start (vmware/vic#3183)
		return opFault(&types.GenericVmConfigFault{Reason: "Module 'MonitorLoop' power on failed."},
			"Module 'MonitorLoop' power on failed.")
	}
	if vm.vmxChanged() {
		if f := vm.reloadLocked(); f != nil {
			return f
		}
	}
	vm.activateCBT()
	vm.Power = poweredOn
	now := time.Now()
	vm.BootTime = &now
	vm.syncModel()
	vm.h.refreshDatastore(vm.DS)
	return nil
}

func (vm *VM) setPower(p types.VirtualMachinePowerState, need ...types.VirtualMachinePowerState) *OpFault {
	if f := vm.lock(); f != nil {
		return f
	}
	defer vm.mu.Unlock()
	ok := false
	for _, n := range need {
		if vm.Power == n {
			ok = true
		}
	}
	if !ok {
		return invalidPowerState(p, vm.Power)
	}
	vm.Power = p
	if p != poweredOn {
		vm.BootTime = nil
	}
	vm.syncModel()
	return nil
}

func (vm *VM) PowerOff() *OpFault      { return vm.setPower(poweredOff, poweredOn, suspended) }
func (vm *VM) Suspend() *OpFault       { return vm.setPower(suspended, poweredOn) }
func (vm *VM) ShutdownGuest() *OpFault { return vm.setPower(poweredOff, poweredOn) }
func (vm *VM) StandbyGuest() *OpFault  { return vm.setPower(suspended, poweredOn) }

func (vm *VM) Reset() *OpFault {
	if f := vm.lock(); f != nil {
		return f
	}
	defer vm.mu.Unlock()
	if vm.Power != poweredOn {
		return invalidPowerState(poweredOn, vm.Power)
	}
	now := time.Now()
	vm.BootTime = &now
	vm.syncModel()
	return nil
}

func (vm *VM) RebootGuest() *OpFault { return vm.Reset() }

// ---------------------------------------------------------------------------
// guest writes

type DiskWrite struct {
	Key     int32     `json:"key"`
	File    string    `json:"file"`
	Written [][]int64 `json:"written"`
}

type GuestWriteResult struct {
	Bytes int64       `json:"bytes"`
	Disks []DiskWrite `json:"disks"`
}

func (vm *VM) GuestWrite(percent float64, seed int64) (*GuestWriteResult, *OpFault) {
	if f := vm.lock(); f != nil {
		return nil, f
	}
	defer vm.mu.Unlock()
	if vm.Power != poweredOn {
		return nil, invalidPowerState(poweredOn, vm.Power)
	}
	res := &GuestWriteResult{Disks: []DiskWrite{}}
	for i, d := range vm.Disks {
		s := seed*7919 + int64(i)
		rng := rand.New(rand.NewSource(s))
		target := int64(percent / 100 * float64(d.Capacity))
		runs := genRuns(rng, d.Capacity, target, 4*kib, mib, 4*kib)
		if err := writeRuns(d.Top.ExtentPath(), runs, s+1); err != nil {
			return nil, opFault(&types.FileFault{File: vm.h.dsPath(d.Top.DescPath())}, "write failed: %v", err)
		}
		if d.Track != nil {
			d.Track.record(runs)
		}
		d.Top.CID = newCID()
		d.Top.LongID = newLongID(d.Top.CID)
		vm.writeDescriptor(d, d.Top)
		dw := DiskWrite{Key: d.Key, File: vm.h.dsPath(d.Top.DescPath()), Written: [][]int64{}}
		for _, r := range runs {
			dw.Written = append(dw.Written, []int64{r.Off, r.Len})
			res.Bytes += r.Len
		}
		res.Disks = append(res.Disks, dw)
	}
	vm.syncModel()
	vm.h.refreshDatastore(vm.DS)
	return res, nil
}

// GuestWriteFrom is a guest that rewrites chosen byte ranges of one disk (index in the VM's disk list)
// with the bytes at the same offsets of a raw image file: a file changed inside a real filesystem, its
// changed blocks computed by the caller. Like GuestWrite it lands in the top of the chain and is
// recorded for CBT.
func (vm *VM) GuestWriteFrom(disk int, image string, ranges []Range) (*GuestWriteResult, *OpFault) {
	if f := vm.lock(); f != nil {
		return nil, f
	}
	defer vm.mu.Unlock()
	if vm.Power != poweredOn {
		return nil, invalidPowerState(poweredOn, vm.Power)
	}
	if disk < 0 || disk >= len(vm.Disks) {
		return nil, opFault(&types.InvalidArgument{InvalidProperty: "disk"}, "no disk %d", disk)
	}
	d := vm.Disks[disk]
	for _, r := range ranges {
		if r.Off < 0 || r.Len <= 0 || r.End() > d.Capacity {
			return nil, opFault(&types.InvalidArgument{InvalidProperty: "ranges"}, "range %d+%d is outside the disk", r.Off, r.Len)
		}
	}
	if err := copyRanges(image, d.Top.ExtentPath(), ranges); err != nil {
		return nil, opFault(&types.FileFault{File: vm.h.dsPath(d.Top.DescPath())}, "write failed: %v", err)
	}
	if d.Track != nil {
		d.Track.record(ranges)
	}
	d.Top.CID = newCID()
	d.Top.LongID = newLongID(d.Top.CID)
	vm.writeDescriptor(d, d.Top)
	res := &GuestWriteResult{Disks: []DiskWrite{}}
	dw := DiskWrite{Key: d.Key, File: vm.h.dsPath(d.Top.DescPath()), Written: [][]int64{}}
	for _, r := range ranges {
		dw.Written = append(dw.Written, []int64{r.Off, r.Len})
		res.Bytes += r.Len
	}
	res.Disks = append(res.Disks, dw)
	vm.syncModel()
	vm.h.refreshDatastore(vm.DS)
	return res, nil
}

// ---------------------------------------------------------------------------
// register / reload / unregister / destroy

func (h *Host) Register(path, name string) (*VM, *OpFault) {
	h.regMu.Lock()
	defer h.regMu.Unlock()
	abs, f := h.resolvePath(path)
	if f != nil {
		return nil, f
	}
	for _, o := range h.VMList() {
		if o.VmxPath == abs {
			return nil, opFault(&types.AlreadyExists{Name: o.ID}, "The specified key, name, or identifier '%s' already exists.", o.ID)
		}
	}
	if !fileExists(abs) {
		return nil, opFault(&types.NotFound{}, "The object or item referred to could not be found.")
	}
	vm, f := h.parseVM(abs, name)
	if f != nil {
		return nil, f
	}
	h.mu.Lock()
	h.nextID++
	vm.ID = strconv.Itoa(h.nextID)
	h.vms[vm.ID] = vm
	h.mu.Unlock()
	for _, s := range vm.allSnaps() {
		s.Ref = types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: fmt.Sprintf("%s-snapshot-%d", vm.ID, s.UID)}
	}
	vm.mu.Lock()
	h.registerObject(vm)
	vm.mu.Unlock()
	h.refreshDatastore(vm.DS)
	logf("registered vm %s (%s) from %s", vm.ID, vm.Name, vm.DSPath())
	return vm, nil
}

// reloadLocked re-reads the .vmx (name, guest, hardware, ctk keys, disks).
func (vm *VM) reloadLocked() *OpFault {
	v, err := ReadVMX(vm.VmxPath)
	if err != nil {
		return opFault(&types.FileFault{File: vm.DSPath()}, "Error caused by file %s", vm.DSPath())
	}
	if f := vm.applyVmx(v, ""); f != nil {
		return f
	}
	// snapshots keep pointing at the (re-read) frozen files
	for _, s := range vm.allSnaps() {
		for key, f := range s.Frozen {
			d := vm.diskByKey(key)
			if d == nil {
				delete(s.Frozen, key)
				continue
			}
			nf, fault := vm.h.loadChain(d, f.Dir, f.Desc, 0)
			if fault == nil {
				s.Frozen[key] = nf
			}
		}
	}
	if st, err := os.Stat(vm.VmxPath); err == nil {
		vm.vmxMod = st.ModTime()
	}
	return nil
}

func (vm *VM) Reload() *OpFault {
	if f := vm.lock(); f != nil {
		return f
	}
	defer vm.mu.Unlock()
	if f := vm.reloadLocked(); f != nil {
		return f
	}
	vm.syncModel()
	vm.h.refreshDatastore(vm.DS)
	return nil
}

func (vm *VM) Unregister() *OpFault {
	if f := vm.lock(); f != nil {
		return f
	}
	defer vm.mu.Unlock()
	if vm.Power == poweredOn {
		return invalidPowerState(poweredOff, vm.Power)
	}
	vm.unregisterLocked()
	return nil
}

func (vm *VM) unregisterLocked() {
	h := vm.h
	h.unregisterObject(vm)
	vm.removed = true
	h.mu.Lock()
	delete(h.vms, vm.ID)
	h.mu.Unlock()
	logf("unregistered vm %s (%s)", vm.ID, vm.Name)
}

func (vm *VM) Destroy() *OpFault {
	if f := vm.lock(); f != nil {
		return f
	}
	defer vm.mu.Unlock()
	if vm.Power == poweredOn {
		return invalidPowerState(poweredOff, vm.Power)
	}
	vm.unregisterLocked()
	for _, d := range vm.Disks {
		for _, f := range append([]*DFile(nil), d.Files...) {
			vm.deleteFile(d, f)
		}
	}
	base := strings.TrimSuffix(vm.vmxBase(), ".vmx")
	for _, pat := range []string{base + ".vmx", base + ".vmsd", base + ".vmxf", base + ".nvram", "vmware*.log",
		base + "-Snapshot*.vmsn", base + "-Snapshot*.vmem", "*.vswp", "*.vmss", "*.lck"} {
		matches, _ := filepath.Glob(filepath.Join(vm.Dir, pat))
		for _, m := range matches {
			_ = os.RemoveAll(m)
		}
	}
	if vm.Dir != vm.DS.Path {
		_ = os.Remove(vm.Dir) // only when empty, as ESXi
	}
	vm.h.refreshDatastore(vm.DS)
	return nil
}

// Rename changes the display name (API Rename_Task).
func (vm *VM) Rename(name string) *OpFault {
	if f := vm.lock(); f != nil {
		return f
	}
	defer vm.mu.Unlock()
	vm.Name = name
	vm.commit()
	return nil
}

// RefreshFromModel takes name/cpu/memory/annotation from the model after a
// reconfigure handled by vcsim, and rewrites the .vmx.
func (vm *VM) RefreshFromModel() {
	if f := vm.lock(); f != nil {
		return
	}
	defer vm.mu.Unlock()
	simulator.Map.WithLock(vm.obj, func() {
		c := vm.obj.Config
		if c.Name != "" {
			vm.Name = c.Name
		}
		if c.Hardware.MemoryMB > 0 {
			vm.MemMB = int(c.Hardware.MemoryMB)
		}
		if c.Hardware.NumCPU > 0 {
			vm.CPUs = int(c.Hardware.NumCPU)
		}
		vm.Annotation = c.Annotation
		if c.GuestId != "" {
			vm.GuestID = c.GuestId
		}
	})
	vm.commit()
}

// CreateVM creates a new VM (API CreateVM_Task): files as ESXi writes them, new
// empty thin/thick disks for the VirtualDisk devices of the spec, then registration.
func (h *Host) CreateVM(spec *types.VirtualMachineConfigSpec) (*VM, *OpFault) {
	if spec.Name == "" {
		return nil, opFault(&types.InvalidArgument{InvalidProperty: "configSpec.name"}, "A specified parameter was not correct: configSpec.name")
	}
	dsName := ""
	if spec.Files != nil {
		p := strings.TrimSpace(spec.Files.VmPathName)
		if strings.HasPrefix(p, "[") && strings.Contains(p, "]") {
			dsName = p[1:strings.Index(p, "]")]
		}
	}
	ds := h.dsByName(dsName)
	if ds == nil {
		return nil, opFault(&types.InvalidDatastorePath{DatastorePath: dsName}, "Invalid datastore path '%s'.", dsName)
	}
	vc := VMConfig{Name: spec.Name, Datastore: ds.Name, GuestID: spec.GuestId, MemoryMB: int(spec.MemoryMB),
		CPUs: int(spec.NumCPUs), Annotation: spec.Annotation}
	if spec.Version != "" {
		vc.HWVersion, _ = strconv.Atoi(strings.TrimPrefix(spec.Version, "vmx-"))
	}
	if spec.ChangeTrackingEnabled != nil {
		vc.CBT = *spec.ChangeTrackingEnabled
	}
	for _, dc := range spec.DeviceChange {
		ds := dc.GetVirtualDeviceConfigSpec()
		disk, ok := ds.Device.(*types.VirtualDisk)
		if !ok || ds.Operation != types.VirtualDeviceConfigSpecOperationAdd {
			continue
		}
		size := disk.CapacityInBytes
		if size == 0 {
			size = disk.CapacityInKB * 1024
		}
		thin := false
		if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok && b.ThinProvisioned != nil {
			thin = *b.ThinProvisioned
		}
		vc.Disks = append(vc.Disks, DiskConfig{Size: size, Thin: &thin})
	}
	dir := filepath.Join(ds.Path, escapeFileName(spec.Name))
	if fileExists(dir) {
		return nil, opFault(&types.FileAlreadyExists{FileFault: types.FileFault{File: h.dsPath(dir)}},
			"Cannot complete the operation because the file or folder %s already exists", h.dsPath(dir))
	}
	path, err := h.createVMFiles(vc)
	if err != nil {
		return nil, opFault(&types.FileFault{File: h.dsPath(dir)}, "%v", err)
	}
	vm, f := h.Register(path, "")
	if f != nil {
		return nil, f
	}
	return vm, nil
}
