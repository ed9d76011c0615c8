package main

// interceptor.go: the TLS front end of the SOAP API. Every /sdk request is read,
// its method and _this found, then: api-slow delay, free-licence RestrictedVersion,
// our own handling (licensed) of the methods that touch disks/CBT/power/inventory,
// otherwise vcsim's ServeMux with the body restored.

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const restrictedMsg = "Current license or ESXi version prohibits execution of the requested operation."

// restricted lists the state-changing methods a free licence refuses.
var restricted = map[string]bool{}

func init() {
	for _, m := range strings.Fields(`
		CreateSnapshot_Task CreateSnapshotEx_Task RemoveSnapshot_Task RemoveAllSnapshots_Task
		RevertToSnapshot_Task RevertToCurrentSnapshot_Task RenameSnapshot ExportSnapshot
		ConsolidateVMDisks_Task EstimateStorageForConsolidateSnapshots_Task
		ReconfigVM_Task PowerOnVM_Task PowerOffVM_Task SuspendVM_Task ResetVM_Task
		ShutdownGuest RebootGuest StandbyGuest PowerOnMultiVM_Task
		RegisterVM_Task CreateVM_Task CloneVM_Task RelocateVM_Task MigrateVM_Task
		UnregisterVM Destroy_Task UnregisterAndDestroy_Task Rename_Task MarkAsTemplate MarkAsVirtualMachine
		UpgradeVM_Task CustomizeVM_Task MountToolsInstaller UnmountToolsInstaller UpgradeTools_Task
		AnswerVM ReloadVirtualMachineFromPath_Task Reload SetCustomValue
		CreateVirtualDisk_Task DeleteVirtualDisk_Task CopyVirtualDisk_Task MoveVirtualDisk_Task
		ExtendVirtualDisk_Task InflateVirtualDisk_Task EagerZeroVirtualDisk_Task ZeroFillVirtualDisk_Task
		ShrinkVirtualDisk_Task DefragmentVirtualDisk_Task SetVirtualDiskUuid ImportUnmanagedSnapshot
		MakeDirectory DeleteDatastoreFile_Task MoveDatastoreFile_Task CopyDatastoreFile_Task
		DeleteFile ChangeOwner
		QueryChangedDiskAreas ExportVm ImportVApp CreateImportSpec
		UpdateLicense AddLicense RemoveLicense UpdateAssignedLicense
		CreateFolder MoveIntoFolder_Task CreateResourcePool CreateVApp
		EnterMaintenanceMode_Task ExitMaintenanceMode_Task RebootHost_Task ShutdownHost_Task
		CreateLocalDatastore CreateNasDatastore CreateVmfsDatastore RemoveDatastore RemoveDatastoreEx_Task
		ExtendDisk_Task InflateDisk_Task
	`) {
		restricted[m] = true
	}
}

// own lists the methods handled here (licensed host) instead of by vcsim.
var own = map[string]bool{
	"CreateSnapshot_Task": true, "RemoveSnapshot_Task": true, "RemoveAllSnapshots_Task": true,
	"RevertToSnapshot_Task": true, "RevertToCurrentSnapshot_Task": true, "ReconfigVM_Task": true,
	"PowerOnVM_Task": true, "PowerOffVM_Task": true, "SuspendVM_Task": true, "ResetVM_Task": true,
	"ShutdownGuest": true, "RebootGuest": true, "StandbyGuest": true,
	"RegisterVM_Task": true, "UnregisterVM": true, "Destroy_Task": true, "Rename_Task": true,
	"QueryChangedDiskAreas": true, "CreateVM_Task": true,
	"CloneVM_Task": true, "RelocateVM_Task": true, "MigrateVM_Task": true,
}

var propertyReads = map[string]bool{
	"RetrieveProperties": true, "RetrievePropertiesEx": true, "ContinueRetrievePropertiesEx": true,
	"WaitForUpdates": true, "WaitForUpdatesEx": true, "CheckForUpdates": true, "Fetch": true,
	"RefreshDatastore": true, "RefreshDatastoreStorageInfo": true,
}

// ---------------------------------------------------------------------------
// listener management (api-down / api-up)

func (h *Host) apiUp(addr string) error {
	h.fe.mu.Lock()
	defer h.fe.mu.Unlock()
	if h.fe.srv != nil {
		return nil
	}
	if h.fe.addr != "" {
		addr = h.fe.addr
	}
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ {
		ln, err = net.Listen("tcp", addr)
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	h.fe.addr = ln.Addr().String()
	tl := tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{h.fe.cert.cert}, MinVersion: tls.VersionTLS12})
	srv := &http.Server{Handler: h.apiHandler(), ReadHeaderTimeout: 30 * time.Second}
	h.fe.srv = srv
	h.fe.ln = tl
	go func() { _ = srv.Serve(tl) }()
	logf("API listener up on %s", h.fe.addr)
	return nil
}

func (h *Host) apiDown() {
	h.fe.mu.Lock()
	defer h.fe.mu.Unlock()
	if h.fe.srv == nil {
		return
	}
	_ = h.fe.srv.Close() // closes the listener and every connection
	h.fe.srv = nil
	h.fe.ln = nil
	logf("API listener down")
}

func (h *Host) delay() time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.apiDelay
}

// ---------------------------------------------------------------------------

func (h *Host) apiHandler() http.Handler {
	mux := h.model.Service.ServeMux
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d := h.delay(); d > 0 {
			time.Sleep(d)
		}
		if strings.HasPrefix(r.URL.Path, "/folder") {
			// datastore HTTP access needs a session cookie or HTTP Basic, as on ESXi
			u, p, basic := r.BasicAuth()
			if !(basic && u == h.cfg.User && p == h.cfg.Password) && !h.authenticated(r) {
				w.Header().Set("WWW-Authenticate", `Basic realm="VMware HTTP server"`)
				http.Error(w, "Unauthorized", http.StatusUnauthorized)
				return
			}
			if r.Method == http.MethodGet {
				h.noteReader(1)
				defer h.noteReader(-1)
			}
			mux.ServeHTTP(w, r)
			return
		}
		if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/sdk") {
			mux.ServeHTTP(w, r)
			return
		}
		if h.injectedAPIError(w) {
			return
		}
		body, err := io.ReadAll(r.Body)
		_ = r.Body.Close()
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		restore := func() {
			r.Body = io.NopCloser(bytes.NewReader(body))
			r.ContentLength = int64(len(body))
		}
		method, this := lightParse(body)
		if propertyReads[method] {
			h.refreshDatastores()
		}
		if (restricted[method] || own[method]) && h.authenticated(r) {
			if h.free() && restricted[method] {
				logf("free licence: %s on %s refused (RestrictedVersion)", method, this.Value)
				writeFault(w, restrictedMsg, &types.RestrictedVersion{})
				return
			}
			if !h.free() && own[method] && h.handleOwn(w, r, method, this, body) {
				return
			}
			if this.Type == "VirtualMachine" && restricted[method] {
				// a state-changing method vcsim handles: serialize with hostops,
				// then take what changed back into our state
				if vm, f := h.VM(this.Value); f == nil {
					restore()
					vm.mu.Lock()
					rec := h.callVcsim(r, method)
					vm.mu.Unlock()
					vm.RefreshFromModel()
					copyRecorded(w, rec)
					return
				}
			}
		}
		restore()
		copyRecorded(w, h.callVcsim(r, method))
	})
}

// callVcsim runs a request through vcsim's ServeMux, turning a panic inside vcsim
// into a SOAP answer (vcsim 0.24's Fetch panics on an unset property, where ESXi
// answers an empty FetchResponse).
func (h *Host) callVcsim(r *http.Request, method string) (rec *httptest.ResponseRecorder) {
	rec = httptest.NewRecorder()
	defer func() {
		if p := recover(); p != nil {
			rec = httptest.NewRecorder()
			if method == "Fetch" {
				rec.Header().Set("Content-Type", "text/xml; charset=utf-8")
				rec.WriteHeader(http.StatusOK)
				rec.WriteString(`<?xml version="1.0" encoding="UTF-8"?>` + "\n" +
					`<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">` +
					`<soapenv:Body><FetchResponse xmlns="urn:vim25"></FetchResponse></soapenv:Body></soapenv:Envelope>`)
				return
			}
			logf("vcsim panic in %s: %v", method, p)
			writeFault(rec, fmt.Sprintf("%v", p), &types.SystemError{Reason: "internal error"})
		}
	}()
	h.model.Service.ServeMux.ServeHTTP(rec, r)
	return rec
}

func copyRecorded(w http.ResponseWriter, rec *httptest.ResponseRecorder) {
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

const probeBody = `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime></soapenv:Body></soapenv:Envelope>`

// authenticated asks vcsim whether the request's session cookie is logged in.
func (h *Host) authenticated(r *http.Request) bool {
	req := httptest.NewRequest(http.MethodPost, "/sdk", strings.NewReader(probeBody))
	for _, c := range r.Cookies() {
		req.AddCookie(c)
	}
	req.RemoteAddr = r.RemoteAddr
	req.Header.Set("User-Agent", r.UserAgent())
	rec := httptest.NewRecorder()
	h.model.Service.ServeMux.ServeHTTP(rec, req)
	return rec.Code == http.StatusOK
}

// runTask creates a vcsim Task for entity and runs fn synchronously in it.
func (h *Host) runTask(entity types.ManagedObjectReference, entityName, name string, fn func() (types.AnyType, *OpFault)) types.ManagedObjectReference {
	return h.startTask(entity, entityName, name, fn, false)
}

// startTask creates a vcsim Task for entity and runs fn in it: synchronously, or (async) in the
// background while the caller gets the task back at once, still running, as ESXi answers.
func (h *Host) startTask(entity types.ManagedObjectReference, entityName, name string, fn func() (types.AnyType, *OpFault), async bool) types.ManagedObjectReference {
	var fault *OpFault
	task := simulator.CreateTask(entity, name, func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		res, f := fn()
		if f != nil {
			fault = f
			return nil, f.Fault
		}
		return res, nil
	})
	task.Info.EntityName = entityName
	run := func() {
		task.Run()
		if fault != nil {
			simulator.Map.WithLock(task, func() {
				simulator.Map.Update(task, []types.PropertyChange{{Name: "info.error",
					Val: &types.LocalizedMethodFault{Fault: fault.Fault, LocalizedMessage: fault.Msg}}})
			})
		}
	}
	if async {
		go run()
	} else {
		run()
	}
	return task.Self
}

func moNotFound(ref types.ManagedObjectReference) *OpFault {
	return opFault(&types.ManagedObjectNotFound{Obj: ref},
		"The object 'vim.%s:%s' has already been deleted or has not been completely created", ref.Type, ref.Value)
}

// handleOwn answers a method itself; false means "let vcsim handle it".
func (h *Host) handleOwn(w http.ResponseWriter, r *http.Request, method string, this types.ManagedObjectReference, body []byte) bool {
	m, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		return false
	}
	// methods on a snapshot
	if this.Type == "VirtualMachineSnapshot" {
		vm, f := h.VMBySnapshotRef(this)
		var snap *Snap
		if f == nil {
			vm.mu.Lock()
			snap = vm.snapByRef(this)
			vm.mu.Unlock()
		}
		if snap == nil {
			writeOpFault(w, moNotFound(this))
			return true
		}
		switch req := m.Body.(type) {
		case *types.RemoveSnapshot_Task:
			children := req.RemoveChildren
			ref := h.runTask(vm.obj.Self, vm.Name, "removeSnapshot", func() (types.AnyType, *OpFault) {
				return nil, vm.RemoveSnapshot(snap, children)
			})
			writeResult(w, &methods.RemoveSnapshot_TaskBody{Res: &types.RemoveSnapshot_TaskResponse{Returnval: ref}})
			return true
		case *types.RevertToSnapshot_Task:
			sup := req.SuppressPowerOn != nil && *req.SuppressPowerOn
			ref := h.runTask(vm.obj.Self, vm.Name, "revertToSnapshot", func() (types.AnyType, *OpFault) {
				return nil, vm.Revert(snap, sup)
			})
			writeResult(w, &methods.RevertToSnapshot_TaskBody{Res: &types.RevertToSnapshot_TaskResponse{Returnval: ref}})
			return true
		}
		return false
	}

	if method == "RegisterVM_Task" {
		req, ok := m.Body.(*types.RegisterVM_Task)
		if !ok {
			return false
		}
		if req.AsTemplate {
			return false
		}
		ref := h.runTask(req.This, "vm", "registerVm", func() (types.AnyType, *OpFault) {
			vm, f := h.Register(req.Path, req.Name)
			if f != nil {
				return nil, f
			}
			return vm.obj.Self, nil
		})
		writeResult(w, &methods.RegisterVM_TaskBody{Res: &types.RegisterVM_TaskResponse{Returnval: ref}})
		return true
	}

	switch method {
	case "CloneVM_Task", "RelocateVM_Task", "MigrateVM_Task":
		// vCenter operations: a standalone ESXi host refuses them
		writeFault(w, "The operation is not supported on the object.", &types.NotSupported{})
		return true
	}
	if method == "CreateVM_Task" {
		req, ok := m.Body.(*types.CreateVM_Task)
		if !ok {
			return false
		}
		ref := h.runTask(req.This, "vm", "createVm", func() (types.AnyType, *OpFault) {
			vm, f := h.CreateVM(&req.Config)
			if f != nil {
				return nil, f
			}
			return vm.obj.Self, nil
		})
		writeResult(w, &methods.CreateVM_TaskBody{Res: &types.CreateVM_TaskResponse{Returnval: ref}})
		return true
	}

	if this.Type != "VirtualMachine" {
		return false
	}
	vm, f := h.VM(this.Value)
	if f != nil {
		writeOpFault(w, moNotFound(this))
		return true
	}
	self := vm.obj.Self
	task := func(name string, fn func() (types.AnyType, *OpFault)) types.ManagedObjectReference {
		return h.runTask(self, vm.Name, name, fn)
	}
	noRes := func(fn func() *OpFault) func() (types.AnyType, *OpFault) {
		return func() (types.AnyType, *OpFault) { return nil, fn() }
	}

	switch req := m.Body.(type) {
	case *types.CreateSnapshot_Task:
		h.mu.Lock()
		slow := h.snapshotDelay > 0 // "snapshot-slow": the task runs on while the client waits for it
		h.mu.Unlock()
		ref := h.startTask(self, vm.Name, "createSnapshot", func() (types.AnyType, *OpFault) {
			s, f := vm.CreateSnapshot(req.Name, req.Description, req.Memory, req.Quiesce)
			if f != nil {
				return nil, f
			}
			return s.Ref, nil
		}, slow)
		writeResult(w, &methods.CreateSnapshot_TaskBody{Res: &types.CreateSnapshot_TaskResponse{Returnval: ref}})
	case *types.RemoveAllSnapshots_Task:
		ref := task("removeAllSnapshots", noRes(vm.RemoveAllSnapshots))
		writeResult(w, &methods.RemoveAllSnapshots_TaskBody{Res: &types.RemoveAllSnapshots_TaskResponse{Returnval: ref}})
	case *types.RevertToCurrentSnapshot_Task:
		vm.mu.Lock()
		cur := vm.Current
		vm.mu.Unlock()
		if cur == nil {
			writeOpFault(w, opFault(&types.NotFound{}, "The object or item referred to could not be found."))
			return true
		}
		sup := req.SuppressPowerOn != nil && *req.SuppressPowerOn
		ref := task("revertToCurrentSnapshot", func() (types.AnyType, *OpFault) { return nil, vm.Revert(cur, sup) })
		writeResult(w, &methods.RevertToCurrentSnapshot_TaskBody{Res: &types.RevertToCurrentSnapshot_TaskResponse{Returnval: ref}})
	case *types.ReconfigVM_Task:
		if req.Spec.ChangeTrackingEnabled == nil {
			return false // vcsim + RefreshFromModel
		}
		on := *req.Spec.ChangeTrackingEnabled
		rest := req.Spec
		rest.ChangeTrackingEnabled = nil
		if !reflect.DeepEqual(rest, types.VirtualMachineConfigSpec{}) {
			// mixed reconfigure: vcsim applies the rest, then CBT here
			r.Body = io.NopCloser(bytes.NewReader(body))
			vm.mu.Lock()
			rec := h.callVcsim(r, method)
			vm.mu.Unlock()
			vm.RefreshFromModel()
			_ = vm.SetCBT(on)
			copyRecorded(w, rec)
			return true
		}
		ref := task("reconfigVm", func() (types.AnyType, *OpFault) { return nil, vm.SetCBT(on) })
		writeResult(w, &methods.ReconfigVM_TaskBody{Res: &types.ReconfigVM_TaskResponse{Returnval: ref}})
	case *types.PowerOnVM_Task:
		ref := task("powerOn", noRes(vm.PowerOn))
		writeResult(w, &methods.PowerOnVM_TaskBody{Res: &types.PowerOnVM_TaskResponse{Returnval: ref}})
	case *types.PowerOffVM_Task:
		ref := task("powerOff", noRes(vm.PowerOff))
		writeResult(w, &methods.PowerOffVM_TaskBody{Res: &types.PowerOffVM_TaskResponse{Returnval: ref}})
	case *types.SuspendVM_Task:
		ref := task("suspend", noRes(vm.Suspend))
		writeResult(w, &methods.SuspendVM_TaskBody{Res: &types.SuspendVM_TaskResponse{Returnval: ref}})
	case *types.ResetVM_Task:
		ref := task("reset", noRes(vm.Reset))
		writeResult(w, &methods.ResetVM_TaskBody{Res: &types.ResetVM_TaskResponse{Returnval: ref}})
	case *types.ShutdownGuest:
		if f := vm.ShutdownGuest(); f != nil {
			writeOpFault(w, f)
		} else {
			writeResult(w, &methods.ShutdownGuestBody{Res: &types.ShutdownGuestResponse{}})
		}
	case *types.RebootGuest:
		if f := vm.RebootGuest(); f != nil {
			writeOpFault(w, f)
		} else {
			writeResult(w, &methods.RebootGuestBody{Res: &types.RebootGuestResponse{}})
		}
	case *types.StandbyGuest:
		if f := vm.StandbyGuest(); f != nil {
			writeOpFault(w, f)
		} else {
			writeResult(w, &methods.StandbyGuestBody{Res: &types.StandbyGuestResponse{}})
		}
	case *types.UnregisterVM:
		if f := vm.Unregister(); f != nil {
			writeOpFault(w, f)
		} else {
			writeResult(w, &methods.UnregisterVMBody{Res: &types.UnregisterVMResponse{}})
		}
	case *types.Destroy_Task:
		ref := task("destroy", noRes(vm.Destroy))
		writeResult(w, &methods.Destroy_TaskBody{Res: &types.Destroy_TaskResponse{Returnval: ref}})
	case *types.Rename_Task:
		name := req.NewName
		ref := task("rename", noRes(func() *OpFault { return vm.Rename(name) }))
		writeResult(w, &methods.Rename_TaskBody{Res: &types.Rename_TaskResponse{Returnval: ref}})
	case *types.QueryChangedDiskAreas:
		info, f := vm.QueryChangedDiskAreas(req.Snapshot, req.DeviceKey, req.StartOffset, req.ChangeId)
		if f != nil {
			writeOpFault(w, f)
		} else {
			writeResult(w, &methods.QueryChangedDiskAreasBody{Res: &types.QueryChangedDiskAreasResponse{Returnval: *info}})
		}
	default:
		return false
	}
	return true
}

var _ soap.HasFault = (*methods.QueryChangedDiskAreasBody)(nil)
