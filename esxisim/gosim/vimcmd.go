package main

// vimcmd.go: vim-cmd argv emulation with ESXi's output formats. vim-cmd is never
// licence-restricted; it calls the same hostops as the SOAP interceptor.

import (
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type vcmd struct {
	usage   string // argument synopsis
	help    string
	min     int
	max     int
	handler func(h *Host, args []string) (string, int) // nil: the command is in vimStderrCommands
}

// vimStderrCommands print on stderr too (a 6.x power failure prints a bare "Power on failed" there).
var vimStderrCommands map[string]func(h *Host, args []string) (string, string, int)

var vimCommands map[string]vcmd

func init() {
	vimCommands = map[string]vcmd{
		"vmsvc/getallvms":               {"", "Get the list of all virtual machines on the host.", 0, 0, cmdGetAllVMs},
		"vmsvc/power.getstate":          {"vmid", "Retrieve the power state of a virtual machine.", 1, 1, cmdPowerGetState},
		"vmsvc/power.on":                {"vmid", "Power on the specified virtual machine.", 1, 1, nil},
		"vmsvc/power.off":               {"vmid", "Power off the specified virtual machine.", 1, 1, nil},
		"vmsvc/power.shutdown":          {"vmid", "Perform a guest shutdown.", 1, 1, nil},
		"vmsvc/power.suspend":           {"vmid", "Suspend the specified virtual machine.", 1, 1, nil},
		"vmsvc/power.reset":             {"vmid", "Reset the specified virtual machine.", 1, 1, nil},
		"vmsvc/power.reboot":            {"vmid", "Perform a guest reboot.", 1, 1, nil},
		"vmsvc/get.summary":             {"vmid", "Get the summary of a virtual machine.", 1, 1, cmdGetSummary},
		"vmsvc/get.config":              {"vmid", "Get the configuration of a virtual machine.", 1, 1, cmdGetConfig},
		"vmsvc/device.getdevices":       {"vmid", "Get the devices of a virtual machine.", 1, 1, cmdGetDevices},
		"vmsvc/get.datastores":          {"vmid", "Get the datastores of a virtual machine.", 1, 1, cmdGetDatastores},
		"vmsvc/get.snapshotinfo":        {"vmid", "Get the snapshot info of a virtual machine.", 1, 1, cmdGetSnapshotInfo},
		"vmsvc/get.filelayout":          {"vmid", "Get the file layout of a virtual machine.", 1, 1, cmdGetFileLayout},
		"vmsvc/get.tasklist":            {"vmid", "Get the list of recent tasks of a virtual machine.", 1, 1, cmdGetTaskList},
		"vmsvc/snapshot.create":         {"vmid [snapshotName] [snapshotDescription] [includeMemory] [quiesced]", "Creates a snapshot of the virtual machine.", 1, 5, cmdSnapCreate},
		"vmsvc/snapshot.get":            {"vmid", "Get the snapshot tree of a virtual machine.", 1, 1, cmdSnapGet},
		"vmsvc/snapshot.remove":         {"vmid snapshotId [removeChildren]", "Remove a snapshot of the virtual machine.", 2, 3, cmdSnapRemove},
		"vmsvc/snapshot.removeall":      {"vmid", "Remove all snapshots of the virtual machine.", 1, 1, cmdSnapRemoveAll},
		"vmsvc/snapshot.revert":         {"vmid snapshotId suppressPowerOff", "Revert the virtual machine to a snapshot.", 2, 3, cmdSnapRevert},
		"vmsvc/reload":                  {"vmid", "Reload the virtual machine configuration.", 1, 1, cmdReload},
		"vmsvc/unregister":              {"vmid", "Unregister the specified virtual machine.", 1, 1, cmdUnregister},
		"vmsvc/destroy":                 {"vmid", "Delete the specified virtual machine.", 1, 1, cmdDestroy},
		"solo/registervm":               {"vmxPath [vmName] [poolId] [hostName]", "Register a virtual machine.", 1, 4, cmdRegister},
		"hostsvc/datastore/listsummary": {"", "List the summaries of all datastores.", 0, 0, cmdDSListSummary},
		"hostsvc/datastore/info":        {"name", "Get the info of a datastore.", 1, 1, cmdDSInfo},
		"vimsvc/license":                {"[--show]", "Display or set license information.", 0, 3, cmdLicense},
	}
	vimStderrCommands = map[string]func(h *Host, args []string) (string, string, int){}
	for _, op := range []string{"on", "off", "shutdown", "suspend", "reset", "reboot"} {
		vimStderrCommands["vmsvc/power."+op] = cmdPower(op)
	}
}

// vimcmd runs one vim-cmd invocation: returns stdout, stderr and the exit code.
func (h *Host) vimcmd(argv []string) (string, string, int) {
	if len(argv) > 0 && (argv[0] == "vim-cmd" || strings.HasSuffix(argv[0], "/vim-cmd")) {
		argv = argv[1:]
	}
	if len(argv) == 0 {
		return "", vimcmdTopUsage(), 1
	}
	name := strings.Trim(argv[0], "/")
	args := argv[1:]
	// also accept "vmsvc getallvms"
	if _, ok := vimCommands[name]; !ok && len(args) > 0 {
		if _, ok := vimCommands[name+"/"+args[0]]; ok {
			name = name + "/" + args[0]
			args = args[1:]
		}
	}
	c, ok := vimCommands[name]
	if !ok {
		ns := name
		if i := strings.LastIndex(name, "/"); i >= 0 {
			ns = name[:i]
		}
		var cmds []string
		for k := range vimCommands {
			if strings.HasPrefix(k, ns+"/") {
				cmds = append(cmds, strings.TrimPrefix(k, ns+"/"))
			}
		}
		if len(cmds) == 0 {
			return "", vimcmdTopUsage(), 1
		}
		sort.Strings(cmds)
		return fmt.Sprintf("Commands available under %s/:\n%s\n", ns, strings.Join(cmds, "\n")), "", 1
	}
	for _, a := range args {
		if a == "-h" || a == "--help" {
			return cmdUsage(name, c, ""), "", 0
		}
	}
	if len(args) < c.min {
		return cmdUsage(name, c, "Insufficient arguments.\n"), "", 1
	}
	if len(args) > c.max {
		return cmdUsage(name, c, "Too many arguments.\n"), "", 1
	}
	var out, errOut string
	var code int
	if withStderr, ok := vimStderrCommands[name]; ok {
		out, errOut, code = withStderr(h, args)
	} else {
		out, code = c.handler(h, args)
	}
	if code != 0 && h.vimcmdExitZero() {
		code = 0 // fault "vimcmd-exit-zero": the failure is only in the text
	}
	if h.vimcmdGarbage(name) {
		return garbageOutput, "", 0 // fault "vimcmd-garbage": done, but the answer is unreadable
	}
	return out, errOut, code
}

func vimcmdTopUsage() string {
	return "Usage: vim-cmd [options] command [args]\n\nCommands available under /:\nhbrsvc/       internalsvc/  solo/         vimsvc/\nhostsvc/      proxysvc/     vmsvc/        help\n"
}

func cmdUsage(name string, c vcmd, prefix string) string {
	short := name[strings.LastIndex(name, "/")+1:]
	u := fmt.Sprintf("%sUsage: %s %s\n\n%s\n", prefix, short, c.usage, c.help)
	return strings.Replace(u, short+" \n", short+"\n", 1)
}

func faultOut(prefix string, f *OpFault) (string, int) {
	return prefix + dumpFault(f), 1
}

func (h *Host) vmArg(id string) (*VM, *OpFault) {
	return h.VM(strings.TrimSpace(id))
}

func boolArg(s string) bool {
	s = strings.ToLower(strings.TrimSpace(s))
	return s == "1" || s == "true" || s == "yes"
}

// ---------------------------------------------------------------------------

// padRight pads by bytes, like hostd (C++ std::string) does.
func padRight(s string, w int) string {
	n := len(s)
	if n >= w {
		return s
	}
	return s + strings.Repeat(" ", w-n)
}

func cmdGetAllVMs(h *Host, _ []string) (string, int) {
	type row struct{ id, name, file, guest, ver, ann string }
	var rows []row
	for _, vm := range h.VMList() {
		vm.mu.Lock()
		if !vm.removed {
			rows = append(rows, row{vm.ID, vm.Name, vm.DSPath(), vm.GuestID, fmt.Sprintf("vmx-%02d", vm.HW), vm.Annotation})
		}
		vm.mu.Unlock()
	}
	w := []int{4, 4, 4, 8, 7}
	for _, r := range rows {
		for i, s := range []string{r.id, r.name, r.file, r.guest, r.ver} {
			if n := len(s); n > w[i] {
				w[i] = n
			}
		}
	}
	gap := []int{3, 3, 3, 3, 3} // columns padded to the widest value plus three blanks (ESXi 6.5-9.0)
	line := func(cols []string, ann string) string {
		var b strings.Builder
		for i, c := range cols {
			b.WriteString(padRight(c, w[i]+gap[i]))
		}
		b.WriteString(ann)
		return b.String() + "\n"
	}
	out := line([]string{"Vmid", "Name", "File", "Guest OS", "Version"}, "Annotation")
	for _, r := range rows {
		ann := strings.Split(r.ann, "\n")
		out += line([]string{r.id, r.name, r.file, r.guest, r.ver}, ann[0])
		for _, l := range ann[1:] {
			out += l + "\n"
		}
	}
	return out, 0
}

func cmdPowerGetState(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	vm.mu.Lock()
	p := vm.Power
	vm.mu.Unlock()
	return "Retrieved runtime info\n" + powerWords(p) + "\n", 0
}

func cmdPower(op string) func(*Host, []string) (string, string, int) {
	return func(h *Host, args []string) (string, string, int) {
		vm, f := h.vmArg(args[0])
		if f != nil {
			out, code := faultOut("", f)
			return out, "", code
		}
		// ESXi 7-9 print the progress line, then "<Op> failed: (vim.fault.X) {" on stdout; 6.x print
		// the progress line on stdout and a bare "<Op> failed" on stderr (tests/fixtures/real).
		var prefix, failed string
		switch op {
		case "on":
			prefix, failed = "Powering on VM:\n", "Power on failed"
			f = vm.PowerOn()
		case "off":
			prefix, failed = "Powering off VM:\n", "Power off failed"
			f = vm.PowerOff()
		case "suspend":
			prefix, failed = "Suspending VM:\n", "Suspend failed"
			f = vm.Suspend()
		case "reset":
			prefix, failed = "Reset VM:\n", "Reset failed"
			f = vm.Reset()
		case "shutdown":
			failed = "Shutdown guest failed"
			f = vm.ShutdownGuest()
		case "reboot":
			failed = "Reboot guest failed"
			f = vm.RebootGuest()
		}
		if f != nil {
			if esxiVer.BarePowerFailure {
				logf("power.%s failed: %s", op, f.Msg)
				return prefix, failed + "\n", 1
			}
			out, code := faultOut(prefix+failed+": ", f)
			return out, "", code
		}
		return prefix, "", 0
	}
}

// modelSnapshot copies what vim-cmd prints from the model object under its lock.
func (vm *VM) modelCopy() *simulator.VirtualMachine {
	var c simulator.VirtualMachine
	simulator.Map.WithLock(vm.obj, func() {
		c.VirtualMachine = vm.obj.VirtualMachine
		if vm.obj.Config != nil {
			cfg := *vm.obj.Config
			c.Config = &cfg
		}
	})
	return &c
}

func cmdGetSummary(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	m := vm.modelCopy()
	return "Listsummary:\n" + dumpObject(&m.Summary) + "\n", 0
}

func cmdGetConfig(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	m := vm.modelCopy()
	return "Configuration:\n" + dumpObject(m.Config) + "\n", 0
}

func cmdGetDevices(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	m := vm.modelCopy()
	return dumpObject(&m.Config.Hardware) + "\n", 0
}

func cmdGetSnapshotInfo(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	m := vm.modelCopy()
	if m.Snapshot == nil {
		return "(vim.vm.SnapshotInfo) null\n", 0
	}
	return dumpObject(m.Snapshot) + "\n", 0
}

func cmdGetFileLayout(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	m := vm.modelCopy()
	return "VM File Layout:\n" + dumpObject(m.Layout) + "\n", 0
}

func cmdGetTaskList(h *Host, args []string) (string, int) {
	if _, f := h.vmArg(args[0]); f != nil {
		return faultOut("", f)
	}
	return "(ManagedObjectReference) []\n", 0
}

func cmdGetDatastores(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	ds := vm.DS
	h.refreshDatastore(ds)
	var b strings.Builder
	kv := func(k string, v interface{}) { fmt.Fprintf(&b, "%-20s %v\n", k, v) }
	kv("name", ds.Name)
	kv("url", "/vmfs/volumes/"+ds.UUID)
	kv("capacity", ds.Capacity)
	kv("freeSpace", h.dsFree(ds))
	kv("accessible", true)
	kv("type", "VMFS")
	kv("multipleHostAccess", false)
	return b.String(), 0
}

// ---------------------------------------------------------------------------
// snapshots

func (h *Host) snapArg(vm *VM, id string) (*Snap, *OpFault) {
	n, err := strconv.Atoi(strings.TrimSpace(id))
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if err == nil {
		if s := vm.snapByUID(n); s != nil {
			return s, nil
		}
	}
	return nil, opFault(&types.NotFound{}, "The object or item referred to could not be found.")
}

func cmdSnapCreate(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	name, desc := "", ""
	var mem, q bool
	if len(args) > 1 {
		name = args[1]
	}
	if len(args) > 2 {
		desc = args[2]
	}
	if len(args) > 3 {
		mem = boolArg(args[3])
	}
	if len(args) > 4 {
		q = boolArg(args[4])
	}
	if _, f := vm.CreateSnapshot(name, desc, mem, q); f != nil {
		return faultOut("Create Snapshot:\n", f)
	}
	return "Create Snapshot:\n", 0
}

func snapTreeText(vm *VM) string {
	var b strings.Builder
	var walk func(list []*Snap, depth int)
	walk = func(list []*Snap, depth int) {
		for _, s := range list {
			p := strings.Repeat("--", depth)
			if depth == 0 {
				b.WriteString("|-ROOT\n")
			} else {
				b.WriteString(p + "|-CHILD\n")
			}
			q := strings.Repeat("--", depth+1)
			t := s.Created.UTC()
			state := "powered off"
			switch s.State {
			case poweredOn:
				state = "powered on"
			case suspended:
				state = "suspended"
			}
			fmt.Fprintf(&b, "%sSnapshot Name        : %s\n", q, s.Name)
			fmt.Fprintf(&b, "%sSnapshot Id        : %d\n", q, s.UID)
			fmt.Fprintf(&b, "%sSnapshot Desciption  : %s\n", q, s.Desc)
			fmt.Fprintf(&b, "%sSnapshot Created On  : %d/%d/%d %02d:%02d:%02d\n", q, int(t.Month()), t.Day(), t.Year(), t.Hour(), t.Minute(), t.Second())
			fmt.Fprintf(&b, "%sSnapshot State       : %s\n", q, state)
			walk(s.Children, depth+1)
		}
	}
	walk(vm.Roots, 0)
	return b.String()
}

func cmdSnapGet(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return "Get Snapshot:\n" + snapTreeText(vm), 0
}

func cmdSnapRemove(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	s, f := h.snapArg(vm, args[1])
	if f != nil {
		return faultOut("Remove Snapshot:\n", f)
	}
	children := len(args) > 2 && boolArg(args[2])
	if f := vm.RemoveSnapshot(s, children); f != nil {
		return faultOut("Remove Snapshot:\n", f)
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return "Remove Snapshot:\n" + snapTreeText(vm), 0
}

func cmdSnapRemoveAll(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	if f := vm.RemoveAllSnapshots(); f != nil {
		return faultOut("Remove All Snapshots:\n", f)
	}
	return "Remove All Snapshots:\n", 0
}

func cmdSnapRevert(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	s, f := h.snapArg(vm, args[1])
	if f != nil {
		return faultOut("Revert Snapshot:\n", f)
	}
	sup := len(args) > 2 && boolArg(args[2])
	if f := vm.Revert(s, sup); f != nil {
		return faultOut("Revert Snapshot:\n", f)
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return "Revert Snapshot:\n" + snapTreeText(vm), 0
}

// ---------------------------------------------------------------------------
// inventory

func cmdReload(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	if f := vm.Reload(); f != nil {
		return faultOut("", f)
	}
	return "", 0
}

func cmdUnregister(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	if f := vm.Unregister(); f != nil {
		return faultOut("", f)
	}
	return "", 0
}

func cmdDestroy(h *Host, args []string) (string, int) {
	vm, f := h.vmArg(args[0])
	if f != nil {
		return faultOut("", f)
	}
	if f := vm.Destroy(); f != nil {
		return faultOut("", f)
	}
	return "", 0
}

func cmdRegister(h *Host, args []string) (string, int) {
	name := ""
	if len(args) > 1 {
		name = args[1]
	}
	vm, f := h.Register(args[0], name)
	if f != nil {
		return faultOut("", f)
	}
	return vm.ID + "\n", 0
}

// ---------------------------------------------------------------------------
// host

func cmdDSListSummary(h *Host, _ []string) (string, int) {
	h.refreshDatastores()
	var sums []types.DatastoreSummary
	for _, ds := range h.dss {
		simulator.Map.WithLock(ds.obj, func() {
			s := ds.obj.Summary
			s.Url = "/vmfs/volumes/" + ds.UUID
			sums = append(sums, s)
		})
	}
	return dumpObject(sums) + "\n", 0
}

func cmdDSInfo(h *Host, args []string) (string, int) {
	ds := h.dsByName(args[0])
	if ds == nil {
		for _, d := range h.dss {
			if d.UUID == args[0] {
				ds = d
			}
		}
	}
	if ds == nil {
		return faultOut("", opFault(&types.NotFound{}, "The object or item referred to could not be found."))
	}
	h.refreshDatastore(ds)
	var info types.BaseDatastoreInfo
	simulator.Map.WithLock(ds.obj, func() {
		if vi, ok := ds.obj.Info.(*types.VmfsDatastoreInfo); ok {
			c := *vi
			c.Url = "/vmfs/volumes/" + ds.UUID
			info = &c
		} else {
			info = ds.obj.Info
		}
	})
	return dumpObject(info) + "\n", 0
}

func cmdLicense(h *Host, args []string) (string, int) {
	show := false
	for _, a := range args {
		if a == "--show" || a == "-s" {
			show = true
		}
	}
	if !show {
		return "Usage: license [--show] [--set=<key>]\n\nDisplay or set license information.\n", 1
	}
	// The shape of ESXi 6.0-9.0 (tests/fixtures/real/vimcmd/license-*.txt): [200] status lines around a
	// report whose fields are indented by three spaces and properties by five.
	l := h.licenseInfo()
	var b strings.Builder
	b.WriteString("[200] Sending request for installed licenses...[200] Complete, result is:\n")
	fmt.Fprintf(&b, "   serial: %s\n", l.LicenseKey)
	fmt.Fprintf(&b, "   vmodl key: %s\n", l.EditionKey)
	fmt.Fprintf(&b, "   name: %s\n", l.Name)
	fmt.Fprintf(&b, "   total: %d\n", l.Total)
	fmt.Fprintf(&b, "   used: %d\n", l.Used)
	fmt.Fprintf(&b, "   unit: %s\n", l.CostUnit)
	b.WriteString("   Properties:\n")
	for _, p := range l.Properties {
		fmt.Fprintf(&b, "     [%s] = %v\n", p.Key, p.Value)
	}
	b.WriteString("\n[200] End of report.\n")
	return b.String(), 0
}
