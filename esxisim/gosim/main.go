// Command esxisim-host is the Go half of esxisim: one simulated standalone ESXi
// host built on the govmomi 0.24 simulator (vcsim, ESX model). docs/lab.md is the
// specification; /work/shared/esxi-reference.md describes the real host.
//
// Build (offline, GOPATH mode):
//
//	cd esxisim/gosim && GO111MODULE=off GOPATH=/usr/share/gocode go build -o /tmp/esxisim-host .
//	GO111MODULE=off GOPATH=/usr/share/gocode go vet . && ... go test .
//
// Usage: esxisim-host --config /abs/DIR/hosts/NAME/sim.json
//
// Structure (one package):
//
//	main.go        sim.json, startup order, ready.json, SIGTERM/SIGINT, shutdown
//	tls.go         self-signed RSA-2048 cert (CN/SAN 127.0.0.1, localhost) in state_dir/tls
//	model.go       vcsim side: ESX model without vcsim's own VMs/datastores, our datastores
//	               (VMFS info, deterministic UUID morefs), VM objects whose moref is the
//	               numeric vim-cmd Vmid, syncModel (hostops state -> model, via
//	               Map.WithLock + Map.Update), snapshot objects with deep-copied config
//	hostops.go     Host/DS/VM/Disk/DFile/Snap state, lookups, paths, datastore free space
//	vmops.go       the operations, one implementation for SOAP and vim-cmd: snapshot
//	               create/remove/removeall/revert (seSparse-named deltas, consolidation by
//	               copying SEEK_DATA ranges, pruning of orphaned branches), power, guest
//	               writes, register/reload/unregister/destroy, CreateVM
//	vmfiles.go     files as ESXi writes them (.vmx with |XX escaping, .vmsd, descriptors,
//	               sparse -flat with seeded scattered runs) and reading them back
//	cbt.go         CBT: activation at stun points, tracking ids, sequence numbers, write
//	               records, ctk files, QueryChangedDiskAreas
//	disk.go        sparse-file primitives, seeded data, range helpers
//	vmx.go         .vmx/.vmsd dictionary, guestOS<->guestId, .vmdk descriptor parser/writer
//	deepcopy.go    reflective deep copy of vim25 objects
//	interceptor.go TLS front end: api-slow/api-down, /folder auth, free-licence
//	               RestrictedVersion, own handling of snapshot/CBT/power/inventory methods
//	               and QCDA (licensed), everything else to vcsim's ServeMux unchanged
//	soap.go        SOAP envelope/fault encoding identical to vcsim's; light request parse
//	vimcmd.go      vim-cmd argv subset with ESXi's output formats, faults, usage texts
//	dump.go        hostd-style "(vim.X) { ... }" dumper used by vim-cmd
//	control.go     control API on state_dir/run/control.sock (0600): /vimcmd,
//	               /guest-write, /fault, /state, /shutdown
//	gosim_test.go  unit + end-to-end tests of hostops, CBT and vim-cmd formats
//
// Locking: a VM operation holds VM.mu (the VM's write lock) for its whole duration,
// changes the files first, then the in-memory state, then the model. Lock order is
// VM.mu -> vcsim object lock; vcsim never takes VM.mu.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

// Config is sim.json.
type Config struct {
	Name    string `json:"name"`
	License string `json:"license"`
	// ESXiVersion is "6.7", "7.0" (default) or "8.0": the outputs that differ (versions.go).
	ESXiVersion string     `json:"esxi_version"`
	Listen      string     `json:"listen"`
	User        string     `json:"user"`
	Password    string     `json:"password"`
	StateDir    string     `json:"state_dir"`
	Helpers     string     `json:"helpers"`
	Datastores  []DSConfig `json:"datastores"`
	VMs         []VMConfig `json:"vms"`
}

type DSConfig struct {
	Name     string `json:"name"`
	Path     string `json:"path"`
	Capacity int64  `json:"capacity"`
}

type VMConfig struct {
	Name       string       `json:"name"`
	Datastore  string       `json:"datastore"`
	GuestID    string       `json:"guest_id"`
	Power      string       `json:"power"`
	CBT        bool         `json:"cbt"`
	HWVersion  int          `json:"hw_version"`
	MemoryMB   int          `json:"memory_mb"`
	CPUs       int          `json:"cpus"`
	Annotation string       `json:"annotation"`
	Disks      []DiskConfig `json:"disks"`
}

type DiskConfig struct {
	Size  int64   `json:"size"`
	Fill  float64 `json:"fill"`
	Seed  int64   `json:"seed"`
	Image *string `json:"image"`
	Thin  *bool   `json:"thin"`
}

func loadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var c Config
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	if c.StateDir == "" {
		c.StateDir = filepath.Dir(path)
	}
	if c.Listen == "" {
		c.Listen = "127.0.0.1:0"
	}
	if c.User == "" {
		c.User = "root"
	}
	if c.Name == "" {
		c.Name = "esxi"
	}
	if err := setESXiVersion(c.ESXiVersion); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	c.ESXiVersion = esxiVer.Name
	return &c, nil
}

func main() {
	cfgPath := flag.String("config", "", "path to sim.json")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetOutput(os.Stderr)
	if *cfgPath == "" {
		fmt.Fprintln(os.Stderr, "usage: esxisim-host --config /abs/DIR/hosts/NAME/sim.json")
		os.Exit(2)
	}
	cfg, err := loadConfig(*cfgPath)
	if err != nil {
		log.Fatalf("config: %v", err)
	}
	log.SetPrefix("esxisim-host[" + cfg.Name + "] ")
	h, err := start(cfg)
	if err != nil {
		if h != nil {
			h.stop()
		}
		log.Fatalf("start: %v", err)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case s := <-sig:
		log.Printf("signal %v: shutting down", s)
	case <-h.quit:
		log.Printf("shutdown requested")
	}
	h.stop()
	log.Printf("stopped")
	os.Exit(0)
}

// server state kept on the Host
type frontEnd struct {
	mu       sync.Mutex
	addr     string // host:port of the API listener
	cert     *tlsMaterial
	srv      *http.Server
	ln       net.Listener
	vcsim    *simulator.Server
	control  *http.Server
	ctlPath  string
	stopOnce sync.Once
}

// addVM writes the files of a VM of sim.json (or of POST /create-vm), registers it and sets its CBT and
// power state.
func (h *Host) addVM(vc VMConfig) (*VM, error) {
	path, err := h.createVMFiles(vc)
	if err != nil {
		return nil, err
	}
	vm, f := h.Register(path, "")
	if f != nil {
		return nil, fmt.Errorf("register %s: %s", vc.Name, f.Msg)
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vc.CBT {
		vm.CtkVM = true
		for _, d := range vm.Disks {
			d.CtkKey = true
			d.Pending = true
		}
		vm.activateCBT()
	}
	switch vc.Power {
	case "poweredOn", "on":
		vm.Power = poweredOn
		now := time.Now()
		vm.BootTime = &now
	case "suspended":
		vm.Power = suspended
	}
	vm.syncModel()
	return vm, nil
}

func start(cfg *Config) (*Host, error) {
	for _, d := range []string{cfg.StateDir, filepath.Join(cfg.StateDir, "tls"), filepath.Join(cfg.StateDir, "run")} {
		if err := os.MkdirAll(d, 0755); err != nil {
			return nil, err
		}
	}
	h := &Host{cfg: cfg, vms: map[string]*VM{}, quit: make(chan struct{})}
	if err := h.buildModel(); err != nil {
		return h, err
	}
	vmfsPath = func(p string) string {
		if ds, rel := h.dsForPath(p); ds != nil {
			return "/vmfs/volumes/" + ds.Name + "/" + rel
		}
		return p
	}
	// VMs from sim.json
	for _, vc := range cfg.VMs {
		if _, err := h.addVM(vc); err != nil {
			return h, err
		}
	}
	h.refreshDatastores()

	// vcsim's own server: internal plain http listener, closed right away; we serve
	// its ServeMux behind our interceptor on the TLS listener.
	svc := h.model.Service
	svc.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(cfg.User, cfg.Password)}
	simulator.DefaultLogin = url.UserPassword(cfg.User, cfg.Password)
	h.fe.vcsim = svc.NewServer()
	h.fe.vcsim.Close()

	cert, err := loadOrCreateCert(filepath.Join(cfg.StateDir, "tls"))
	if err != nil {
		return h, err
	}
	h.fe.cert = cert
	if err := h.apiUp(cfg.Listen); err != nil {
		return h, err
	}
	simulator.Map.SessionManager().ServiceHostName = h.fe.addr
	if err := h.startControl(); err != nil {
		return h, err
	}
	if err := h.writeReady(); err != nil {
		return h, err
	}
	log.Printf("serving https://%s/sdk (%s licence), %d VMs, control %s", h.fe.addr, cfg.License, len(h.vms), h.fe.ctlPath)
	return h, nil
}

func (h *Host) writeReady() error {
	_, port, _ := net.SplitHostPort(h.fe.addr)
	var p int
	fmt.Sscanf(port, "%d", &p)
	ready := map[string]interface{}{
		"pid":               os.Getpid(),
		"api_url":           fmt.Sprintf("https://%s/sdk", h.fe.addr),
		"api_port":          p,
		"thumbprint_sha1":   h.fe.cert.sha1,
		"thumbprint_sha256": h.fe.cert.sha256,
		"cert":              h.fe.cert.certPath,
		"control_socket":    h.fe.ctlPath,
	}
	data, _ := json.MarshalIndent(ready, "", "  ")
	return writeFileAtomic(filepath.Join(h.cfg.StateDir, "ready.json"), append(data, '\n'), 0644)
}

func (h *Host) stop() {
	h.fe.stopOnce.Do(func() {
		h.apiDown()
		if h.fe.control != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = h.fe.control.Shutdown(ctx)
			cancel()
		}
		if h.fe.ctlPath != "" {
			_ = os.Remove(h.fe.ctlPath)
		}
		_ = os.Remove(filepath.Join(h.cfg.StateDir, "ready.json"))
		if h.model != nil {
			h.model.Remove()
		}
	})
}
