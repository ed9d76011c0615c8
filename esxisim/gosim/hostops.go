package main

// hostops.go: the single implementation of every host operation. Both the SOAP
// interceptor and vim-cmd (control API) call these functions. Every operation on a
// VM takes that VM's write lock (VM.mu), changes the files on the datastore first,
// then the in-memory state, then pushes the state into the vcsim model (syncModel).

import (
	"crypto/rand"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

// OpFault is an operation failure carrying the vim fault and its message.
type OpFault struct {
	Fault types.BaseMethodFault
	Msg   string
}

func (f *OpFault) Error() string { return f.Msg }

func opFault(fault types.BaseMethodFault, format string, args ...interface{}) *OpFault {
	return &OpFault{Fault: fault, Msg: fmt.Sprintf(format, args...)}
}

func vmNotFound(id string) *OpFault {
	return opFault(&types.NotFound{}, "Unable to find a VM corresponding to \"%s\"", id)
}

func invalidPowerState(requested, existing types.VirtualMachinePowerState) *OpFault {
	return opFault(&types.InvalidPowerState{RequestedState: requested, ExistingState: existing},
		"The attempted operation cannot be performed in the current state (%s).", powerWords(existing))
}

func powerWords(p types.VirtualMachinePowerState) string {
	switch p {
	case types.VirtualMachinePowerStatePoweredOn:
		return "Powered on"
	case types.VirtualMachinePowerStateSuspended:
		return "Suspended"
	default:
		return "Powered off"
	}
}

// Host is the simulated ESXi host: configuration, the vcsim model and all VM state.
type Host struct {
	cfg    *Config
	model  *simulator.Model
	client *vim25.Client

	mu     sync.Mutex
	regMu  sync.Mutex
	vms    map[string]*VM
	nextID int
	dss    []*DS

	snapshotFail bool
	powerOnFail  bool            // fault "power-on-fail": every power-on fails (API and vim-cmd)
	exitZero     bool            // fault "vimcmd-exit-zero": vim-cmd exits 0 even after a fault
	garbage      map[string]bool // fault "vimcmd-garbage": these vim-cmd commands ("" = all) print garbage
	apiDelay     time.Duration
	lastRefresh  time.Time

	quit chan struct{}
	fe   frontEnd

	refs struct {
		dc, vmFolder, host, pool, network, envBrowser types.ManagedObjectReference
	}
}

// DS is a datastore: a directory on the real file system.
type DS struct {
	Name     string
	Path     string
	Capacity int64
	UUID     string
	Ref      types.ManagedObjectReference
	obj      *simulator.Datastore
}

// DFile is one file of a disk chain: descriptor + extent (+ ctk while CBT is active).
type DFile struct {
	Dir    string // absolute directory
	Desc   string // descriptor base name
	Extent string // extent base name
	Parent *DFile
	CID    uint32
	LongID string
	Delta  bool
	Ctk    string // ctk base name, "" when none
	DDB    *VMX
}

func (f *DFile) DescPath() string   { return filepath.Join(f.Dir, f.Desc) }
func (f *DFile) ExtentPath() string { return filepath.Join(f.Dir, f.Extent) }

// Chain returns the files from the base to f.
func (f *DFile) Chain() []*DFile {
	var out []*DFile
	for x := f; x != nil; x = x.Parent {
		out = append([]*DFile{x}, out...)
	}
	return out
}

// Disk is a virtual disk (scsi0:Unit) with its file tree and CBT state.
type Disk struct {
	Ctrl     int
	Unit     int
	Key      int32
	Capacity int64
	Thin     bool
	DDBUUID  string // "60 00 C2 9a ..."
	Top      *DFile
	Files    []*DFile
	CtkKey   bool // scsi0:N.ctkEnabled
	Track    *Tracking
	Pending  bool // CBT enabled, waiting for a stun point
}

func (d *Disk) Node() string { return fmt.Sprintf("scsi%d:%d", d.Ctrl, d.Unit) }

func (d *Disk) Base() *DFile {
	x := d.Top
	for x.Parent != nil {
		x = x.Parent
	}
	return x
}

func (d *Disk) children(f *DFile) []*DFile {
	var out []*DFile
	for _, x := range d.Files {
		if x.Parent == f {
			out = append(out, x)
		}
	}
	return out
}

func (d *Disk) removeFile(f *DFile) {
	for i, x := range d.Files {
		if x == f {
			d.Files = append(d.Files[:i], d.Files[i+1:]...)
			return
		}
	}
}

func (d *Disk) findFile(dir, name string) *DFile {
	for _, x := range d.Files {
		if x.Dir == dir && x.Desc == name {
			return x
		}
	}
	return nil
}

// Snap is a snapshot in the VM's tree.
type Snap struct {
	UID      int
	Name     string
	Desc     string
	Created  time.Time
	State    types.VirtualMachinePowerState
	Memory   bool
	Quiesced bool
	Parent   *Snap
	Children []*Snap
	Frozen   map[int32]*DFile  // by disk key: the file frozen by this snapshot
	Cbt      map[int32]snapCbt // by disk key
	Vmsn     string
	Vmem     string
	Ref      types.ManagedObjectReference
	obj      *simulator.VirtualMachineSnapshot
}

type snapCbt struct {
	ID  string
	Seq int
}

// VM is one registered virtual machine.
type VM struct {
	mu sync.Mutex
	h  *Host

	ID         string
	Name       string
	DS         *DS
	Dir        string // absolute VM directory
	VmxPath    string // absolute .vmx path
	vmx        *VMX
	vmxMod     time.Time
	Power      types.VirtualMachinePowerState
	BootTime   *time.Time
	GuestID    string
	HW         int
	MemMB      int
	CPUs       int
	Annotation string
	BiosUUID   string // standard form
	InstUUID   string // standard form
	MAC        string
	CtkVM      bool
	Disks      []*Disk
	Roots      []*Snap
	Current    *Snap
	LastUID    int
	removed    bool

	provisioned int64 // sum of disk capacities (atomic; read without VM.mu)

	obj *simulator.VirtualMachine
}

func (vm *VM) vmxBase() string { return filepath.Base(vm.VmxPath) }

// DSPath returns "[ds] dir/file.vmx".
func (vm *VM) DSPath() string { return vm.h.dsPath(vm.VmxPath) }

func (vm *VM) diskByKey(key int32) *Disk {
	for _, d := range vm.Disks {
		if d.Key == key {
			return d
		}
	}
	return nil
}

func (vm *VM) allSnaps() []*Snap {
	var out []*Snap
	var walk func([]*Snap)
	walk = func(l []*Snap) {
		for _, s := range l {
			out = append(out, s)
			walk(s.Children)
		}
	}
	walk(vm.Roots)
	return out
}

func (vm *VM) snapByUID(uid int) *Snap {
	for _, s := range vm.allSnaps() {
		if s.UID == uid {
			return s
		}
	}
	return nil
}

func (vm *VM) snapByRef(ref types.ManagedObjectReference) *Snap {
	for _, s := range vm.allSnaps() {
		if s.Ref == ref {
			return s
		}
	}
	return nil
}

// ---------------------------------------------------------------------------
// host level lookups

func (h *Host) VM(id string) (*VM, *OpFault) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if vm, ok := h.vms[id]; ok {
		return vm, nil
	}
	return nil, vmNotFound(id)
}

func (h *Host) VMByName(name string) *VM {
	for _, vm := range h.VMList() {
		if vm.Name == name || vm.ID == name {
			return vm
		}
	}
	return nil
}

// VMList returns the VMs sorted by numeric id.
func (h *Host) VMList() []*VM {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*VM, 0, len(h.vms))
	for _, vm := range h.vms {
		out = append(out, vm)
	}
	sort.Slice(out, func(i, j int) bool {
		a, _ := strconv.Atoi(out[i].ID)
		b, _ := strconv.Atoi(out[j].ID)
		return a < b
	})
	return out
}

// VMBySnapshotRef finds the VM owning a snapshot moref ("<vmid>-snapshot-<uid>").
func (h *Host) VMBySnapshotRef(ref types.ManagedObjectReference) (*VM, *OpFault) {
	i := strings.Index(ref.Value, "-snapshot-")
	if i < 0 {
		return nil, opFault(&types.ManagedObjectNotFound{Obj: ref}, "The object '%s' has already been deleted or has not been completely created", ref.Value)
	}
	vm, f := h.VM(ref.Value[:i])
	if f != nil {
		return nil, opFault(&types.ManagedObjectNotFound{Obj: ref}, "The object '%s' has already been deleted or has not been completely created", ref.Value)
	}
	return vm, nil
}

func (h *Host) dsByName(name string) *DS {
	for _, ds := range h.dss {
		if ds.Name == name {
			return ds
		}
	}
	return nil
}

// dsForPath finds the datastore holding an absolute path.
func (h *Host) dsForPath(abs string) (*DS, string) {
	for _, ds := range h.dss {
		rel, err := filepath.Rel(ds.Path, abs)
		// "..%2f..%2fescape" (a VM named "../../escape") is a folder inside the datastore: only ".." as a
		// whole path element leads out
		if err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
			return ds, filepath.ToSlash(rel)
		}
	}
	return nil, ""
}

// dsPath converts an absolute path to "[ds] rel/path".
func (h *Host) dsPath(abs string) string {
	ds, rel := h.dsForPath(abs)
	if ds == nil {
		return abs
	}
	if rel == "." {
		rel = ""
	}
	return fmt.Sprintf("[%s] %s", ds.Name, rel)
}

// resolvePath converts "[ds] rel", "/vmfs/volumes/ds/rel" or a real absolute path
// to an absolute host path.
func (h *Host) resolvePath(p string) (string, *OpFault) {
	p = strings.TrimSpace(p)
	if strings.HasPrefix(p, "[") {
		i := strings.Index(p, "]")
		if i < 0 {
			return "", opFault(&types.InvalidDatastorePath{DatastorePath: p}, "Invalid datastore path '%s'.", p)
		}
		ds := h.dsByName(p[1:i])
		if ds == nil {
			return "", opFault(&types.NotFound{}, "The object or item referred to could not be found.")
		}
		return filepath.Join(ds.Path, strings.TrimSpace(p[i+1:])), nil
	}
	if strings.HasPrefix(p, "/vmfs/volumes/") {
		rest := strings.TrimPrefix(p, "/vmfs/volumes/")
		parts := strings.SplitN(rest, "/", 2)
		for _, ds := range h.dss {
			if ds.Name == parts[0] || ds.UUID == parts[0] {
				if len(parts) == 1 {
					return ds.Path, nil
				}
				return filepath.Join(ds.Path, parts[1]), nil
			}
		}
		return "", opFault(&types.NotFound{}, "The object or item referred to could not be found.")
	}
	if filepath.IsAbs(p) {
		if ds, _ := h.dsForPath(p); ds != nil {
			return filepath.Clean(p), nil
		}
	}
	return "", opFault(&types.InvalidDatastorePath{DatastorePath: p}, "Invalid datastore path '%s'.", p)
}

// refreshDatastores recomputes free space (capacity - allocated bytes) into the model.
func (h *Host) refreshDatastores() {
	h.mu.Lock()
	if time.Since(h.lastRefresh) < 100*time.Millisecond {
		h.mu.Unlock()
		return
	}
	h.lastRefresh = time.Now()
	h.mu.Unlock()
	for _, ds := range h.dss {
		h.refreshDatastore(ds)
	}
}

func (h *Host) dsFree(ds *DS) int64 {
	free := ds.Capacity - allocatedBytes(ds.Path)
	if free < 0 {
		free = 0
	}
	return free
}

func (h *Host) refreshDatastore(ds *DS) {
	if ds.obj == nil {
		return
	}
	free := h.dsFree(ds)
	var uncommitted int64
	for _, vm := range h.VMList() {
		if vm.DS == ds {
			uncommitted += atomic.LoadInt64(&vm.provisioned)
		}
	}
	uncommitted -= ds.Capacity - free
	if uncommitted < 0 {
		uncommitted = 0
	}
	simulator.Map.WithLock(ds.obj, func() {
		if ds.obj.Summary.FreeSpace == free && ds.obj.Summary.Capacity == ds.Capacity &&
			ds.obj.Summary.Uncommitted == uncommitted {
			return
		}
		now := time.Now()
		changes := []types.PropertyChange{
			{Name: "summary.capacity", Val: ds.Capacity},
			{Name: "summary.freeSpace", Val: free},
			{Name: "summary.uncommitted", Val: uncommitted},
		}
		if vi, ok := ds.obj.Info.(*types.VmfsDatastoreInfo); ok {
			ni := *vi
			ni.FreeSpace = free
			ni.Timestamp = &now
			if vi.Vmfs != nil {
				v := *vi.Vmfs
				v.Capacity = ds.Capacity
				ni.Vmfs = &v
			}
			changes = append(changes, types.PropertyChange{Name: "info", Val: &ni})
		}
		simulator.Map.Update(ds.obj, changes)
	})
}

// ---------------------------------------------------------------------------
// ids

func randBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// spacedUUID formats 16 bytes as ESXi's "56 4d 12 ... 9a-bc de ..." form.
func spacedUUID(b []byte) string {
	var s []string
	for i := 0; i < 8; i++ {
		s = append(s, fmt.Sprintf("%02x", b[i]))
	}
	var t []string
	for i := 8; i < 16; i++ {
		t = append(t, fmt.Sprintf("%02x", b[i]))
	}
	return strings.Join(s, " ") + "-" + strings.Join(t, " ")
}

// stdUUID formats 16 bytes as 8-4-4-4-12.
func stdUUID(b []byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// parseSpacedUUID converts "56 4d ...-..." (or a std uuid) to 16 bytes.
func parseSpacedUUID(s string) []byte {
	h := strings.NewReplacer(" ", "", "-", "").Replace(s)
	if len(h) != 32 {
		return nil
	}
	b := make([]byte, 16)
	for i := 0; i < 16; i++ {
		n, err := strconv.ParseUint(h[2*i:2*i+2], 16, 8)
		if err != nil {
			return nil
		}
		b[i] = byte(n)
	}
	return b
}

func newDDBUUID() string {
	b := randBytes(16)
	b[0], b[1], b[2] = 0x60, 0x00, 0xC2
	b[3] = 0x90 | (b[3] & 0x0f)
	s := spacedUUID(b)
	// ESXi writes the ddb.uuid with upper-case C2
	return strings.Replace(s, "60 00 c2", "60 00 C2", 1)
}

func newCID() uint32 {
	b := randBytes(4)
	c := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	if c == 0xffffffff || c == 0xfffffffe {
		c = 0x1234567
	}
	return c
}

func newLongID(cid uint32) string {
	return fmt.Sprintf("%x%08x", randBytes(12), cid)
}

// escapeFileName is the folder and file name ESXi gives a new VM: "%", "/" and backslash escaped as %XX.
// Control characters (a line break in a display name) are escaped the same way here, so the lab's
// descriptors and .vmsd stay line-based text; what ESXi itself does with them is unconfirmed.
func escapeFileName(name string) string {
	var b strings.Builder
	for _, r := range name {
		switch {
		case r == '%' || r == '/' || r == '\\' || r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, "%%%02x", r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func logf(format string, args ...interface{}) {
	log.Printf(format, args...)
}

// garbageOutput is what vim-cmd prints under the "vimcmd-garbage" fault: control characters, a NUL, an
// unknown object and lines that almost look like real output (a product must name the command, not
// guess).
const garbageOutput = "\x1b[0m\x00(vim.Garbled) {\n   \u00ff\u00fe\x7f ## hostd answered nonsense ##\n" +
	"Snapshot Nme   :: ???\n--Snapshot Id :\nVmid Nmae File\n\x1b[2J}\n"

// vimcmdGarbage tells whether vim-cmd must print garbage for command “name“ (fault injection: the
// command still runs, only its output is garbled).
func (h *Host) vimcmdGarbage(name string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.garbage[""] || h.garbage[name]
}

// vimcmdExitZero tells whether vim-cmd must hide its failures from the exit status (fault injection:
// a product that trusted the exit status would take a failure for a success).
func (h *Host) vimcmdExitZero() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.exitZero
}
