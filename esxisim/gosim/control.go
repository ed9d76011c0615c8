package main

// control.go: the control API, HTTP/1.1 + JSON on state_dir/run/control.sock (0600).

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

func (h *Host) startControl() error {
	path := filepath.Join(h.cfg.StateDir, "run", "control.sock")
	_ = os.Remove(path)
	old := syscallUmask(0177)
	ln, err := net.Listen("unix", path)
	syscallUmask(old)
	if err != nil {
		return err
	}
	if err := os.Chmod(path, 0600); err != nil {
		return err
	}
	h.fe.ctlPath = path
	mux := http.NewServeMux()
	mux.HandleFunc("/vimcmd", h.ctlVimcmd)
	mux.HandleFunc("/guest-write", h.ctlGuestWrite)
	mux.HandleFunc("/guest-write-from", h.ctlGuestWriteFrom)
	mux.HandleFunc("/fault", h.ctlFault)
	mux.HandleFunc("/create-vm", h.ctlCreateVM)
	mux.HandleFunc("/state", h.ctlState)
	mux.HandleFunc("/shutdown", h.ctlShutdown)
	h.fe.control = &http.Server{Handler: mux}
	go func() { _ = h.fe.control.Serve(ln) }()
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

func jsonError(w http.ResponseWriter, status int, format string, args ...interface{}) {
	writeJSON(w, status, map[string]interface{}{"error": fmt.Sprintf(format, args...)})
}

func readJSON(w http.ResponseWriter, r *http.Request, v interface{}) bool {
	if r.Method != http.MethodPost {
		jsonError(w, http.StatusMethodNotAllowed, "POST required")
		return false
	}
	if err := json.NewDecoder(r.Body).Decode(v); err != nil {
		jsonError(w, http.StatusBadRequest, "bad JSON: %v", err)
		return false
	}
	return true
}

func (h *Host) ctlVimcmd(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Argv []string `json:"argv"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	out, errOut, code := h.vimcmd(req.Argv)
	writeJSON(w, http.StatusOK, map[string]interface{}{"stdout": out, "stderr": errOut, "exit": code})
}

func (h *Host) ctlGuestWrite(w http.ResponseWriter, r *http.Request) {
	var req struct {
		VM      json.RawMessage `json:"vm"`
		Percent float64         `json:"percent"`
		Seed    int64           `json:"seed"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	var name string
	if err := json.Unmarshal(req.VM, &name); err != nil {
		var n int
		if json.Unmarshal(req.VM, &n) == nil {
			name = strconv.Itoa(n)
		}
	}
	vm := h.VMByName(name)
	if vm == nil {
		jsonError(w, http.StatusNotFound, "no VM %q", name)
		return
	}
	if req.Percent <= 0 || req.Percent > 100 {
		jsonError(w, http.StatusBadRequest, "percent must be in (0, 100]")
		return
	}
	res, f := vm.GuestWrite(req.Percent, req.Seed)
	if f != nil {
		jsonError(w, http.StatusConflict, "%s", f.Msg)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// ctlGuestWriteFrom: {"vm": name, "disk": index, "image": path, "ranges": [{"off": o, "len": n}]}.
func (h *Host) ctlGuestWriteFrom(w http.ResponseWriter, r *http.Request) {
	var req struct {
		VM     string  `json:"vm"`
		Disk   int     `json:"disk"`
		Image  string  `json:"image"`
		Ranges []Range `json:"ranges"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	vm := h.VMByName(req.VM)
	if vm == nil {
		jsonError(w, http.StatusNotFound, "no VM %q", req.VM)
		return
	}
	res, f := vm.GuestWriteFrom(req.Disk, req.Image, req.Ranges)
	if f != nil {
		jsonError(w, http.StatusConflict, "%s", f.Msg)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (h *Host) ctlFault(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Kind    string `json:"kind"`
		DelayMS int64  `json:"delay_ms"`
		Enabled *bool  `json:"enabled"`
		VM      string `json:"vm"`
		Command string `json:"command"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	switch req.Kind {
	case "api-slow":
		h.mu.Lock()
		h.apiDelay = time.Duration(req.DelayMS) * time.Millisecond
		h.mu.Unlock()
	case "api-down":
		h.apiDown()
	case "api-up":
		if err := h.apiUp(h.fe.addr); err != nil {
			jsonError(w, http.StatusInternalServerError, "api-up: %v", err)
			return
		}
	case "snapshot-fail":
		on := req.Enabled == nil || *req.Enabled
		h.mu.Lock()
		h.snapshotFail = on
		h.mu.Unlock()
	case "power-on-fail":
		on := req.Enabled == nil || *req.Enabled
		h.mu.Lock()
		h.powerOnFail = on
		h.mu.Unlock()
	case "vimcmd-exit-zero":
		on := req.Enabled == nil || *req.Enabled
		h.mu.Lock()
		h.exitZero = on
		h.mu.Unlock()
	case "vimcmd-garbage":
		on := req.Enabled == nil || *req.Enabled
		h.mu.Lock()
		if h.garbage == nil {
			h.garbage = map[string]bool{}
		}
		if on {
			h.garbage[strings.Trim(req.Command, "/")] = true
		} else {
			delete(h.garbage, strings.Trim(req.Command, "/"))
		}
		h.mu.Unlock()
	case "cbt-reset":
		vm := h.VMByName(req.VM)
		if vm == nil {
			jsonError(w, http.StatusNotFound, "no VM %q", req.VM)
			return
		}
		vm.ResetCBT()
	case "clear":
		h.mu.Lock()
		h.apiDelay = 0
		h.snapshotFail = false
		h.powerOnFail = false
		h.exitZero = false
		h.garbage = nil
		h.mu.Unlock()
		if err := h.apiUp(h.fe.addr); err != nil {
			jsonError(w, http.StatusInternalServerError, "api-up: %v", err)
			return
		}
	default:
		jsonError(w, http.StatusBadRequest, "unknown fault kind %q", req.Kind)
		return
	}
	logf("fault %s applied", req.Kind)
	writeJSON(w, http.StatusOK, map[string]interface{}{"ok": true})
}

// ctlCreateVM adds a VM while the host runs (body: one VM of sim.json), for tests that need a VM the
// default lab does not have; remove it with vim-cmd vmsvc/destroy.
func (h *Host) ctlCreateVM(w http.ResponseWriter, r *http.Request) {
	var vc VMConfig
	if !readJSON(w, r, &vc) {
		return
	}
	if vc.Name == "" || len(vc.Disks) == 0 {
		jsonError(w, http.StatusBadRequest, "a VM needs a name and at least one disk")
		return
	}
	if vc.Datastore == "" && len(h.cfg.Datastores) > 0 {
		vc.Datastore = h.cfg.Datastores[0].Name
	}
	if ds := h.dsByName(vc.Datastore); ds != nil && fileExists(filepath.Join(ds.Path, escapeFileName(vc.Name))) {
		jsonError(w, http.StatusConflict, "the folder of VM %q already exists", vc.Name)
		return
	}
	vm, err := h.addVM(vc)
	if err != nil {
		jsonError(w, http.StatusBadRequest, "create-vm: %v", err)
		return
	}
	h.refreshDatastore(vm.DS)
	logf("created vm %s (%q)", vm.ID, vm.Name)
	writeJSON(w, http.StatusOK, map[string]interface{}{"vmid": vm.ID, "vmx": vm.DSPath()})
}

var quitOnce sync.Once

func (h *Host) ctlShutdown(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]interface{}{"ok": true})
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	quitOnce.Do(func() { close(h.quit) })
}

// ---------------------------------------------------------------------------
// GET /state

type stateFile struct {
	Desc   string `json:"descriptor"`
	Extent string `json:"extent"`
	Ctk    string `json:"ctk,omitempty"`
	CID    string `json:"cid"`
	Parent string `json:"parent,omitempty"`
}

type stateDisk struct {
	Key        int32       `json:"key"`
	Node       string      `json:"node"`
	Capacity   int64       `json:"capacity"`
	Thin       bool        `json:"thin"`
	UUID       string      `json:"uuid"`
	File       string      `json:"file"`
	Chain      []stateFile `json:"chain"`
	CtkEnabled bool        `json:"ctk_enabled"`
	CbtActive  bool        `json:"cbt_active"`
	CbtPending bool        `json:"cbt_pending"`
	ChangeID   string      `json:"change_id,omitempty"`
}

type stateSnap struct {
	ID        int               `json:"id"`
	Moref     string            `json:"moref"`
	Name      string            `json:"name"`
	Desc      string            `json:"description"`
	Created   string            `json:"created"`
	State     string            `json:"state"`
	Parent    int               `json:"parent,omitempty"`
	Current   bool              `json:"current"`
	Frozen    map[string]string `json:"frozen"`
	ChangeIDs map[string]string `json:"change_ids"`
}

func (h *Host) ctlState(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, h.State())
}

func (h *Host) State() map[string]interface{} {
	var vms []interface{}
	for _, vm := range h.VMList() {
		vm.mu.Lock()
		if vm.removed {
			vm.mu.Unlock()
			continue
		}
		var disks []stateDisk
		for _, d := range vm.Disks {
			sd := stateDisk{Key: d.Key, Node: d.Node(), Capacity: d.Capacity, Thin: d.Thin, UUID: d.DDBUUID,
				File: h.dsPath(d.Top.DescPath()), CtkEnabled: vm.CtkVM && d.CtkKey,
				CbtActive: d.Track != nil, CbtPending: d.Pending}
			if d.Track != nil {
				sd.ChangeID = d.Track.ChangeID()
			}
			for _, f := range d.Top.Chain() {
				sf := stateFile{Desc: h.dsPath(f.DescPath()), Extent: h.dsPath(f.ExtentPath()), CID: fmt.Sprintf("%08x", f.CID)}
				if f.Ctk != "" {
					sf.Ctk = h.dsPath(f.DiskCtkPath())
				}
				if f.Parent != nil {
					sf.Parent = h.dsPath(f.Parent.DescPath())
				}
				sd.Chain = append(sd.Chain, sf)
			}
			disks = append(disks, sd)
		}
		var snaps []stateSnap
		for _, s := range vm.allSnaps() {
			ss := stateSnap{ID: s.UID, Moref: s.Ref.Value, Name: s.Name, Desc: s.Desc,
				Created: s.Created.UTC().Format(time.RFC3339), State: string(s.State), Current: vm.Current == s,
				Frozen: map[string]string{}, ChangeIDs: map[string]string{}}
			if s.Parent != nil {
				ss.Parent = s.Parent.UID
			}
			for k, f := range s.Frozen {
				ss.Frozen[strconv.Itoa(int(k))] = h.dsPath(f.DescPath())
			}
			for k, c := range s.Cbt {
				if c.ID != "" {
					ss.ChangeIDs[strconv.Itoa(int(k))] = fmt.Sprintf("%s/%d", c.ID, c.Seq)
				}
			}
			snaps = append(snaps, ss)
		}
		item := map[string]interface{}{
			"vmid": vm.ID, "name": vm.Name, "power": string(vm.Power), "vmx": vm.DSPath(),
			"vmx_path": vm.VmxPath, "datastore": vm.DS.Name, "guest_id": vm.GuestID,
			"hw_version": vm.HW, "cbt": map[string]interface{}{"vm_ctk_enabled": vm.CtkVM},
			"disks": disks, "snapshots": snaps,
		}
		if vm.Current != nil {
			item["current_snapshot"] = vm.Current.UID
		}
		vm.mu.Unlock()
		vms = append(vms, item)
	}
	var dss []interface{}
	for _, ds := range h.dss {
		dss = append(dss, map[string]interface{}{"name": ds.Name, "path": ds.Path, "capacity": ds.Capacity,
			"free_space": h.dsFree(ds), "moref": ds.Ref.Value, "uuid": ds.UUID})
	}
	h.fe.mu.Lock()
	up := h.fe.srv != nil
	h.fe.mu.Unlock()
	h.mu.Lock()
	faults := map[string]interface{}{"api_delay_ms": h.apiDelay.Milliseconds(), "snapshot_fail": h.snapshotFail,
		"power_on_fail": h.powerOnFail, "vimcmd_exit_zero": h.exitZero, "api_down": !up,
		"vimcmd_garbage": garbageCommands(h.garbage)}
	h.mu.Unlock()
	if vms == nil {
		vms = []interface{}{}
	}
	return map[string]interface{}{"name": h.cfg.Name, "license": h.cfg.License, "esxi_version": esxiVer.Name,
		"api_addr": h.fe.addr,
		"vms":      vms, "datastores": dss, "faults": faults}
}

// garbageCommands lists the vim-cmd commands under the "vimcmd-garbage" fault ("" = every command).
func garbageCommands(set map[string]bool) []string {
	out := []string{}
	for name := range set {
		out = append(out, name)
	}
	sort.Strings(out)
	return out
}
