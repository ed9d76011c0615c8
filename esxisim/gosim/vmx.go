package main

// vmx.go: .vmx / .vmsd dictionaries (with the |XX escaping) and .vmdk descriptors.

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/simulator"
)

// VMX is an ordered "key = value" dictionary as used by .vmx and .vmsd files.
// Keys are compared case-insensitively (as vmx does) but written as first seen.
type VMX struct {
	keys []string
	vals map[string]string // lower(key) -> value
	orig map[string]string // lower(key) -> key as written
}

func NewVMX() *VMX {
	return &VMX{vals: map[string]string{}, orig: map[string]string{}}
}

func (v *VMX) Get(key string) string { return v.vals[strings.ToLower(key)] }

func (v *VMX) Has(key string) bool { _, ok := v.vals[strings.ToLower(key)]; return ok }

func (v *VMX) Bool(key string) bool {
	s := strings.ToLower(strings.TrimSpace(v.Get(key)))
	return s == "true" || s == "1" || s == "yes"
}

func (v *VMX) Set(key, val string) {
	lk := strings.ToLower(key)
	if _, ok := v.vals[lk]; !ok {
		v.keys = append(v.keys, lk)
		v.orig[lk] = key
	}
	v.vals[lk] = val
}

func (v *VMX) Del(key string) {
	lk := strings.ToLower(key)
	if _, ok := v.vals[lk]; !ok {
		return
	}
	delete(v.vals, lk)
	delete(v.orig, lk)
	for i, k := range v.keys {
		if k == lk {
			v.keys = append(v.keys[:i], v.keys[i+1:]...)
			break
		}
	}
}

// DelPrefix removes every key starting with prefix (case-insensitive).
func (v *VMX) DelPrefix(prefix string) {
	lp := strings.ToLower(prefix)
	for _, k := range append([]string(nil), v.keys...) {
		if strings.HasPrefix(k, lp) {
			v.Del(k)
		}
	}
}

// Keys returns the keys as written, in file order.
func (v *VMX) Keys() []string {
	out := make([]string, len(v.keys))
	for i, k := range v.keys {
		out[i] = v.orig[k]
	}
	return out
}

// vmxEscape applies the |XX escaping of '"', '|' and control characters.
func vmxEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '"' || c == '|' || c < 0x20 || c == 0x7f {
			fmt.Fprintf(&b, "|%02X", c)
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

func vmxUnescape(s string) string {
	if !strings.Contains(s, "|") {
		return s
	}
	var b bytes.Buffer
	for i := 0; i < len(s); i++ {
		if s[i] == '|' && i+2 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(n))
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

var vmxLine = regexp.MustCompile(`^\s*([^=#\s][^=]*?)\s*=\s*(.*?)\s*$`)

func ParseVMX(data []byte) *VMX {
	v := NewVMX()
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 1024*1024), 16*1024*1024)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		m := vmxLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		val := m[2]
		if len(val) >= 2 && val[0] == '"' && val[len(val)-1] == '"' {
			val = val[1 : len(val)-1]
		}
		v.Set(m[1], vmxUnescape(val))
	}
	return v
}

func ReadVMX(path string) (*VMX, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseVMX(data), nil
}

func (v *VMX) Bytes() []byte {
	var b bytes.Buffer
	for _, k := range v.keys {
		fmt.Fprintf(&b, "%s = \"%s\"\n", v.orig[k], vmxEscape(v.vals[k]))
	}
	return b.Bytes()
}

// writeFileAtomic writes data to path via a temporary file and rename.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ---------------------------------------------------------------------------
// guestOS (vmx) <-> guestId (API)

var guestOSReverse map[string]string

func guestOSFromID(id string) string {
	s := strings.TrimSuffix(id, "Guest")
	s = strings.ToLower(s)
	s = strings.Replace(s, "_64", "-64", 1)
	if strings.HasSuffix(s, "64") && !strings.HasSuffix(s, "-64") {
		s = s[:len(s)-2] + "-64"
	}
	if s == "" {
		s = "other"
	}
	return s
}

func guestIDFromOS(os string) string {
	if guestOSReverse == nil {
		guestOSReverse = map[string]string{}
		for _, id := range simulator.GuestID {
			k := guestOSFromID(string(id))
			if _, ok := guestOSReverse[k]; !ok {
				guestOSReverse[k] = string(id)
			}
		}
	}
	if id, ok := guestOSReverse[strings.ToLower(os)]; ok {
		return id
	}
	if strings.HasSuffix(os, "-64") {
		return "other64Guest"
	}
	return "otherGuest"
}

// ---------------------------------------------------------------------------
// .vmdk descriptors

type Extent struct {
	Access  string
	Sectors int64
	Type    string
	File    string
}

type Descriptor struct {
	Version         int
	CID             uint32
	ParentCID       uint32
	CreateType      string
	ParentHint      string
	Extents         []Extent
	ChangeTrackPath string
	DDB             *VMX
}

func (d *Descriptor) Capacity() int64 {
	var n int64
	for _, e := range d.Extents {
		n += e.Sectors
	}
	return n * 512
}

var extentLine = regexp.MustCompile(`^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"(.*)")?`)

func ParseDescriptor(data []byte) (*Descriptor, error) {
	if len(data) > 64*1024 || !bytes.Contains(data, []byte("Disk DescriptorFile")) {
		return nil, fmt.Errorf("not a disk descriptor")
	}
	d := &Descriptor{DDB: NewVMX(), ParentCID: 0xffffffff, Version: 1}
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(strings.TrimRight(line, "\r"))
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if m := extentLine.FindStringSubmatch(line); m != nil {
			n, _ := strconv.ParseInt(m[2], 10, 64)
			d.Extents = append(d.Extents, Extent{Access: m[1], Sectors: n, Type: m[3], File: m[4]})
			continue
		}
		i := strings.Index(line, "=")
		if i < 0 {
			continue
		}
		k := strings.TrimSpace(line[:i])
		val := strings.TrimSpace(line[i+1:])
		if len(val) >= 2 && val[0] == '"' && val[len(val)-1] == '"' {
			val = val[1 : len(val)-1]
		}
		switch strings.ToLower(k) {
		case "version":
			d.Version, _ = strconv.Atoi(val)
		case "cid":
			n, _ := strconv.ParseUint(val, 16, 32)
			d.CID = uint32(n)
		case "parentcid":
			n, _ := strconv.ParseUint(val, 16, 32)
			d.ParentCID = uint32(n)
		case "createtype":
			d.CreateType = val
		case "parentfilenamehint":
			d.ParentHint = val
		case "changetrackpath":
			d.ChangeTrackPath = val
		case "encoding", "isnativesnapshot":
		default:
			if strings.HasPrefix(strings.ToLower(k), "ddb.") {
				d.DDB.Set(k, vmxUnescape(val))
			}
		}
	}
	if len(d.Extents) == 0 {
		return nil, fmt.Errorf("descriptor has no extent")
	}
	return d, nil
}

func ReadDescriptor(path string) (*Descriptor, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseDescriptor(data)
}

func (d *Descriptor) Bytes() []byte {
	var b bytes.Buffer
	b.WriteString("# Disk DescriptorFile\n")
	v := d.Version
	if d.ChangeTrackPath != "" {
		v = 3
	} else if v == 0 || v == 3 {
		v = 1
	}
	fmt.Fprintf(&b, "version=%d\n", v)
	b.WriteString("encoding=\"UTF-8\"\n")
	fmt.Fprintf(&b, "CID=%08x\n", d.CID)
	fmt.Fprintf(&b, "parentCID=%08x\n", d.ParentCID)
	b.WriteString("isNativeSnapshot=\"no\"\n")
	fmt.Fprintf(&b, "createType=\"%s\"\n", d.CreateType)
	if d.ParentHint != "" {
		fmt.Fprintf(&b, "parentFileNameHint=\"%s\"\n", d.ParentHint)
	}
	b.WriteString("\n# Extent description\n")
	for _, e := range d.Extents {
		if e.File != "" {
			fmt.Fprintf(&b, "%s %d %s \"%s\"\n", e.Access, e.Sectors, e.Type, e.File)
		} else {
			fmt.Fprintf(&b, "%s %d %s\n", e.Access, e.Sectors, e.Type)
		}
	}
	if d.ChangeTrackPath != "" {
		b.WriteString("\n# Change Tracking File\n")
		fmt.Fprintf(&b, "changeTrackPath=\"%s\"\n", d.ChangeTrackPath)
	}
	b.WriteString("\n# The Disk Data Base \n#DDB\n\n")
	keys := d.DDB.Keys()
	sort.Slice(keys, func(i, j int) bool { return strings.ToLower(keys[i]) < strings.ToLower(keys[j]) })
	for _, k := range keys {
		fmt.Fprintf(&b, "%s = \"%s\"\n", k, vmxEscape(d.DDB.Get(k)))
	}
	return b.Bytes()
}
