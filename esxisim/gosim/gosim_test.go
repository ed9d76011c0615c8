package main

// Run: cd esxisim/gosim && GO111MODULE=off GOPATH=/usr/share/gocode go test .

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmware/govmomi/vim25/types"
)

func TestVmxEscaping(t *testing.T) {
	v := NewVMX()
	name := "db \"x\" $(id) | 日本\tend"
	v.Set("displayName", name)
	data := v.Bytes()
	if !bytes.Contains(data, []byte(`displayName = "db |22x|22 $(id) |7C 日本|09end"`)) {
		t.Fatalf("escaping: %s", data)
	}
	if got := ParseVMX(data).Get("DISPLAYNAME"); got != name {
		t.Fatalf("roundtrip: %q", got)
	}
}

func TestDescriptorRoundtrip(t *testing.T) {
	f := &DFile{Dir: t.TempDir(), Desc: "a b-000001.vmdk", Extent: "a b-000001-sesparse.vmdk", CID: 0x1234abcd, Delta: true, DDB: NewVMX(),
		Parent: &DFile{Desc: "a b.vmdk", CID: 0xfd71677b}}
	f.Parent.Dir = f.Dir
	if err := writeDescriptorFile(f, 64*mib); err != nil {
		t.Fatal(err)
	}
	d, err := ReadDescriptor(f.DescPath())
	if err != nil {
		t.Fatal(err)
	}
	if d.CID != 0x1234abcd || d.ParentCID != 0xfd71677b || d.ParentHint != "a b.vmdk" || d.CreateType != "seSparse" ||
		d.Capacity() != 64*mib || d.Extents[0].Type != "SESPARSE" || d.Extents[0].File != "a b-000001-sesparse.vmdk" {
		t.Fatalf("descriptor: %+v", d)
	}
}

func TestCoalesce(t *testing.T) {
	got := coalesce([]Range{{8192, 4096}, {0, 4096}, {4096, 4096}, {20000, 10}, {20005, 10}})
	want := []Range{{0, 12288}, {20000, 15}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%v", got)
	}
}

// logical reads a disk's logical content through its chain (top wins).
func logical(t *testing.T, d *Disk, top *DFile) []byte {
	buf := make([]byte, d.Capacity)
	for _, f := range top.Chain() {
		rs, err := dataRanges(f.ExtentPath())
		if err != nil {
			t.Fatal(err)
		}
		fh, err := os.Open(f.ExtentPath())
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			if _, err := fh.ReadAt(buf[r.Off:r.End()], r.Off); err != nil {
				t.Fatal(err)
			}
		}
		fh.Close()
	}
	return buf
}

func sum(b []byte) string { s := sha256.Sum256(b); return fmt.Sprintf("%x", s[:8]) }

func TestHost(t *testing.T) {
	dir := t.TempDir()
	thin := true
	cfg := &Config{Name: "t", License: "licensed", Listen: "127.0.0.1:0", User: "root", Password: "pw", StateDir: filepath.Join(dir, "h"),
		Datastores: []DSConfig{{Name: "ds1", Path: filepath.Join(dir, "h", "datastores", "ds1"), Capacity: 100 * gib}},
		VMs: []VMConfig{{Name: "web 01", Datastore: "ds1", Power: "poweredOn", CBT: true,
			Disks: []DiskConfig{{Size: 8 * mib, Fill: 0.25, Seed: 1, Thin: &thin}, {Size: 4 * mib, Fill: 0.5, Seed: 2}}}}}
	h, err := start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer h.stop()
	vm, f := h.VM("1")
	if f != nil {
		t.Fatal(f)
	}
	if vm.obj.Self.Value != "1" || vm.Name != "web 01" {
		t.Fatalf("vm %s %q", vm.obj.Self.Value, vm.Name)
	}
	d := vm.Disks[0]
	if d.Track == nil || d.Key != 2000 || vm.Disks[1].Key != 2001 {
		t.Fatalf("disks: %+v", d)
	}
	before := sum(logical(t, d, d.Top))

	s1, f := vm.CreateSnapshot("s1", "", false, false)
	if f != nil {
		t.Fatal(f)
	}
	if s1.Frozen[2000].Desc != "web 01.vmdk" || d.Top.Desc != "web 01-000001.vmdk" || d.Top.Parent != s1.Frozen[2000] {
		t.Fatalf("after create: top %s", d.Top.Desc)
	}
	// the snapshot's frozen device backing and changeId
	var frozenBacking *types.VirtualDiskFlatVer2BackingInfo
	for _, dev := range s1.obj.Config.Hardware.Device {
		if disk, ok := dev.(*types.VirtualDisk); ok && disk.Key == 2000 {
			frozenBacking = disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		}
	}
	if frozenBacking == nil || frozenBacking.FileName != "[ds1] web 01/web 01.vmdk" || frozenBacking.ChangeId == "" {
		t.Fatalf("frozen backing %+v", frozenBacking)
	}
	cid1 := frozenBacking.ChangeId

	gw, f := vm.GuestWrite(5, 7)
	if f != nil {
		t.Fatal(f)
	}
	s2, f := vm.CreateSnapshot("s2", "", false, false)
	if f != nil {
		t.Fatal(f)
	}
	info, f := vm.QueryChangedDiskAreas(&s2.Ref, 2000, 0, cid1)
	if f != nil {
		t.Fatal(f)
	}
	var want []Range
	for _, w := range gw.Disks[0].Written {
		want = append(want, Range{w[0], w[1]})
	}
	var got []Range
	for _, a := range info.ChangedArea {
		got = append(got, Range{a.Start, a.Length})
	}
	if fmt.Sprint(coalesce(want)) != fmt.Sprint(got) {
		t.Fatalf("QCDA %v want %v", got, coalesce(want))
	}
	if _, f := vm.QueryChangedDiskAreas(&s2.Ref, 2000, 0, "52 00 00/1"); f == nil {
		t.Fatal("bad change id accepted")
	}
	atS2 := sum(logical(t, d, d.Top))
	if _, f := vm.GuestWrite(5, 8); f != nil {
		t.Fatal(f)
	}
	now := sum(logical(t, d, d.Top))

	// remove s1 (consolidates web 01-000001 into the base); s2's view is unchanged
	if f := vm.RemoveSnapshot(s1, false); f != nil {
		t.Fatal(f)
	}
	if got := sum(logical(t, d, s2.Frozen[2000])); got != atS2 {
		t.Fatalf("s2 content changed after removing s1")
	}
	if got := sum(logical(t, d, d.Top)); got != now {
		t.Fatalf("current content changed after removing s1")
	}
	if fileExists(filepath.Join(vm.Dir, "web 01-000001.vmdk")) || len(d.Top.Chain()) != 2 || s2.Frozen[2000] != d.Base() {
		t.Fatalf("delta files left: chain %d", len(d.Top.Chain()))
	}
	// revert to s2 discards the current writes and gives CBT a new id
	oldID := d.Track.ID
	if f := vm.Revert(s2, false); f != nil {
		t.Fatal(f)
	}
	if got := sum(logical(t, d, d.Top)); got != atS2 || d.Track.ID == oldID || vm.Power != poweredOff {
		t.Fatalf("revert: content %v id %v power %s", got == atS2, d.Track.ID == oldID, vm.Power)
	}
	if f := vm.RemoveAllSnapshots(); f != nil {
		t.Fatal(f)
	}
	if d.Top.Delta || sum(logical(t, d, d.Top)) != atS2 || before == atS2 {
		t.Fatal("removeall")
	}
	ents, _ := os.ReadDir(vm.Dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), "-0000") || strings.HasSuffix(e.Name(), ".vmsn") {
			t.Fatalf("left over %s", e.Name())
		}
	}

	// vim-cmd formats
	out, _, code := h.vimcmd([]string{"vmsvc/getallvms"})
	if code != 0 || !strings.HasPrefix(out, "Vmid   Name   ") || !strings.Contains(out, "[ds1] web 01/web 01.vmx") {
		t.Fatalf("getallvms:\n%s", out)
	}
	out, _, code = h.vimcmd([]string{"vmsvc/power.getstate", "2"})
	if code != 1 || !strings.Contains(out, "(vim.fault.NotFound) {\n   faultCause = (vmodl.MethodFault) null, \n   faultMessage = <unset>\n   msg = \"Unable to find a VM corresponding to \"2\"\"\n}") {
		t.Fatalf("fault:\n%s", out)
	}
	h.vimcmd([]string{"vmsvc/snapshot.create", "1", "a", "desc"})
	out, _, _ = h.vimcmd([]string{"vmsvc/snapshot.get", "1"})
	if !strings.Contains(out, "Get Snapshot:\n|-ROOT\n--Snapshot Name        : a\n--Snapshot Id        : 3\n--Snapshot Desciption  : desc\n") {
		t.Fatalf("snapshot.get:\n%s", out)
	}
	out, _, code = h.vimcmd([]string{"vmsvc/snapshot.remove"})
	if code != 1 || !strings.Contains(out, "snapshotId") {
		t.Fatalf("usage:\n%s", out)
	}
	out, _, _ = h.vimcmd([]string{"vimsvc/license", "--show"})
	if !strings.Contains(out, "Enterprise Plus") {
		t.Fatalf("license:\n%s", out)
	}
}

func TestEscapeFileName(t *testing.T) {
	for in, want := range map[string]string{
		"web01":                "web01",
		"a/b\\c%d":             "a%2fb%5cc%25d",
		"web01\n+ backup evil": "web01%0a+ backup evil",
		"tab\tx\x1b[31m\x7f日本": "tab%09x%1b[31m%7f日本",
	} {
		if got := escapeFileName(in); got != want {
			t.Errorf("escapeFileName(%q) = %q, want %q", in, got, want)
		}
	}
}
