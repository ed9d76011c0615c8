package main

// cbt.go: changed block tracking (tracking ids, sequence numbers, write records,
// QueryChangedDiskAreas).

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/vim25/types"
)

// Tracking is the active CBT state of one disk.
type Tracking struct {
	ID     string // "52 0f 3a ... e1-6b 92 ... 4c"
	Seq    int
	Writes []cbtWrite
}

type cbtWrite struct {
	Seq int
	Off int64
	Len int64
}

func newTracking() *Tracking {
	b := randBytes(16)
	b[0] = 0x52
	return &Tracking{ID: spacedUUID(b), Seq: 1}
}

func (t *Tracking) ChangeID() string { return fmt.Sprintf("%s/%d", t.ID, t.Seq) }

func (t *Tracking) record(rs []Range) {
	for _, r := range rs {
		t.Writes = append(t.Writes, cbtWrite{Seq: t.Seq, Off: r.Off, Len: r.Len})
	}
}

func parseChangeID(s string) (string, int, bool) {
	i := strings.LastIndex(s, "/")
	if i < 0 {
		return "", 0, false
	}
	n, err := strconv.Atoi(s[i+1:])
	if err != nil {
		return "", 0, false
	}
	return strings.TrimSpace(s[:i]), n, true
}

// ctk files ------------------------------------------------------------------

func ctkName(desc string) string {
	return strings.TrimSuffix(desc, ".vmdk") + "-ctk.vmdk"
}

func writeCtk(f *DFile, t *Tracking, capacity int64) {
	if f.Ctk == "" {
		f.Ctk = ctkName(f.Desc)
	}
	content := fmt.Sprintf("esxisim change tracking file\ntrackingId=%s\nsequence=%d\ncapacity=%d\n", t.ID, t.Seq, capacity)
	_ = os.WriteFile(f.DiskCtkPath(), []byte(content), 0600)
}

func (f *DFile) DiskCtkPath() string { return f.Dir + "/" + f.Ctk }

// activateCBT is called at a stun point (power on, snapshot create/remove).
func (vm *VM) activateCBT() {
	for _, d := range vm.Disks {
		if d.Pending && vm.CtkVM && d.CtkKey && d.Track == nil {
			d.Track = newTracking()
			writeCtk(d.Top, d.Track, d.Capacity)
			vm.writeDescriptor(d, d.Top)
		}
		d.Pending = false
	}
}

// deactivateCBT forgets tracking for a disk and removes its ctk files.
func (vm *VM) deactivateCBT(d *Disk) {
	d.Track = nil
	d.Pending = false
	for _, f := range d.Files {
		if f.Ctk != "" {
			_ = os.Remove(f.DiskCtkPath())
			f.Ctk = ""
			vm.writeDescriptor(d, f)
		}
	}
}

// setCBT switches the vmx ctkEnabled keys (VM and every disk), as ReconfigVM does.
func (vm *VM) setCBT(on bool) {
	vm.CtkVM = on
	for _, d := range vm.Disks {
		d.CtkKey = on
		if on {
			if d.Track == nil {
				d.Pending = true
			}
		} else {
			vm.deactivateCBT(d)
		}
	}
	// Tracking becomes active at the next stun point (power on, snapshot create/remove).
}

// SetCBT is the locked entry point (API ReconfigVM changeTrackingEnabled).
func (vm *VM) SetCBT(on bool) *OpFault {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.removed {
		return vmNotFound(vm.ID)
	}
	if on && vm.HW < 7 {
		return opFault(&types.NotSupported{}, "The operation is not supported on the object.")
	}
	vm.setCBT(on)
	vm.writeVmx()
	vm.syncModel()
	return nil
}

// ResetCBT forgets the history and gives a new tracking id (fault injection).
func (vm *VM) ResetCBT() {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	for _, d := range vm.Disks {
		if d.Track != nil {
			d.Track = newTracking()
			writeCtk(d.Top, d.Track, d.Capacity)
		}
	}
	vm.syncModel()
}

// QueryChangedDiskAreas implements the API method.
func (vm *VM) QueryChangedDiskAreas(snapRef *types.ManagedObjectReference, key int32, start int64, changeID string) (*types.DiskChangeInfo, *OpFault) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	d := vm.diskByKey(key)
	if d == nil {
		return nil, opFault(&types.InvalidArgument{InvalidProperty: "deviceKey"}, "A specified parameter was not correct: deviceKey")
	}
	var snap *Snap
	if snapRef != nil {
		snap = vm.snapByRef(*snapRef)
		if snap == nil {
			return nil, opFault(&types.ManagedObjectNotFound{Obj: *snapRef}, "The object '%s' has already been deleted or has not been completely created", snapRef.Value)
		}
	}
	fileName := vm.h.dsPath(d.Top.DescPath())
	if snap != nil {
		if f := snap.Frozen[d.Key]; f != nil {
			fileName = vm.h.dsPath(f.DescPath())
		}
	}
	if d.Track == nil {
		return nil, opFault(&types.FileFault{File: fileName}, "Error caused by file %s", fileName)
	}
	if start < 0 || start >= d.Capacity {
		return nil, opFault(&types.InvalidArgument{InvalidProperty: "startOffset"}, "A specified parameter was not correct: startOffset")
	}
	info := &types.DiskChangeInfo{StartOffset: start, Length: d.Capacity - start}

	upper := -1 // no upper bound (current state)
	if snap != nil {
		sc, ok := snap.Cbt[d.Key]
		if !ok || sc.ID == "" {
			return nil, opFault(&types.FileFault{File: fileName}, "Error caused by file %s", fileName)
		}
		if sc.ID != d.Track.ID && strings.TrimSpace(changeID) != "*" {
			return nil, opFault(&types.InvalidArgument{InvalidProperty: "changeId"}, "A specified parameter was not correct: changeId")
		}
		upper = sc.Seq
	}

	if strings.TrimSpace(changeID) == "*" {
		top := d.Top
		if snap != nil && snap.Frozen[d.Key] != nil {
			top = snap.Frozen[d.Key]
		}
		var all []Range
		for _, f := range top.Chain() {
			rs, err := dataRanges(f.ExtentPath())
			if err != nil {
				return nil, opFault(&types.FileFault{File: fileName}, "Error caused by file %s", fileName)
			}
			all = append(all, rs...)
		}
		for _, r := range coalesce(clip(all, start, d.Capacity)) {
			info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: r.Off, Length: r.Len})
		}
		return info, nil
	}

	id, seq, ok := parseChangeID(changeID)
	if !ok || id != d.Track.ID || seq < 1 || seq > d.Track.Seq || (upper >= 0 && seq > upper) {
		return nil, opFault(&types.InvalidArgument{InvalidProperty: "changeId"}, "A specified parameter was not correct: changeId")
	}
	var rs []Range
	for _, w := range d.Track.Writes {
		if w.Seq >= seq && (upper < 0 || w.Seq < upper) {
			rs = append(rs, Range{w.Off, w.Len})
		}
	}
	for _, r := range coalesce(clip(rs, start, d.Capacity)) {
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: r.Off, Length: r.Len})
	}
	return info, nil
}
