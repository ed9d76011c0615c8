package main

// dump.go: hostd/vim-cmd style dumps of vim25 objects:
//
//	(vim.vm.Summary) {
//	   vm = 'vim.VirtualMachine:1',
//	   runtime = (vim.vm.RuntimeInfo) {
//	      ...
//	   },
//	   ...
//	}

import (
	"fmt"
	"reflect"
	"strings"
	"time"

	"github.com/vmware/govmomi/vim25/types"
)

var vmodlNames = map[string]string{
	"VirtualMachineSummary":                  "vim.vm.Summary",
	"VirtualMachineConfigSummary":            "vim.vm.Summary.ConfigSummary",
	"VirtualMachineStorageSummary":           "vim.vm.Summary.StorageSummary",
	"VirtualMachineGuestSummary":             "vim.vm.Summary.GuestSummary",
	"VirtualMachineQuickStats":               "vim.vm.Summary.QuickStats",
	"VirtualMachineRuntimeInfo":              "vim.vm.RuntimeInfo",
	"VirtualMachineConfigInfo":               "vim.vm.ConfigInfo",
	"VirtualMachineFileInfo":                 "vim.vm.FileInfo",
	"VirtualMachineFlagInfo":                 "vim.vm.FlagInfo",
	"VirtualMachineDefaultPowerOpInfo":       "vim.vm.DefaultPowerOpInfo",
	"VirtualMachineBootOptions":              "vim.vm.BootOptions",
	"VirtualMachineSnapshotInfo":             "vim.vm.SnapshotInfo",
	"VirtualMachineSnapshotTree":             "vim.vm.SnapshotTree",
	"VirtualMachineFileLayout":               "vim.vm.FileLayout",
	"VirtualMachineFileLayoutDiskLayout":     "vim.vm.FileLayout.DiskLayout",
	"VirtualMachineFileLayoutSnapshotLayout": "vim.vm.FileLayout.SnapshotLayout",
	"VirtualHardware":                        "vim.vm.VirtualHardware",
	"ToolsConfigInfo":                        "vim.vm.ToolsConfigInfo",
	"LatencySensitivity":                     "vim.LatencySensitivity",
	"Description":                            "vim.Description",
	"SharesInfo":                             "vim.SharesInfo",
	"ResourceAllocationInfo":                 "vim.ResourceAllocationInfo",
	"StorageIOAllocationInfo":                "vim.StorageResourceManager.IOAllocationInfo",
	"OptionValue":                            "vim.option.OptionValue",
	"DatastoreSummary":                       "vim.Datastore.Summary",
	"VmfsDatastoreInfo":                      "vim.host.VmfsDatastoreInfo",
	"LocalDatastoreInfo":                     "vim.host.LocalDatastoreInfo",
	"HostVmfsVolume":                         "vim.host.VmfsVolume",
	"HostScsiDiskPartition":                  "vim.host.ScsiDisk.Partition",
	"VirtualDeviceConnectInfo":               "vim.vm.device.VirtualDevice.ConnectInfo",
	"VirtualDevicePciBusSlotInfo":            "vim.vm.device.VirtualDevice.PciBusSlotInfo",
	"VirtualDiskFlatVer2BackingInfo":         "vim.vm.device.VirtualDisk.FlatVer2BackingInfo",
	"VirtualEthernetCardNetworkBackingInfo":  "vim.vm.device.VirtualEthernetCard.NetworkBackingInfo",
	"VirtualPointingDeviceDeviceBackingInfo": "vim.vm.device.VirtualPointingDevice.DeviceBackingInfo",
	"MethodFault":                            "vmodl.MethodFault",
	"LocalizableMessage":                     "vmodl.LocalizableMessage",
	"KeyAnyValue":                            "vmodl.KeyAnyValue",
	"ManagedObjectReference":                 "vmodl.ManagedObject",
}

var vmodlFaults = map[string]bool{
	"HostCommunication": true, "HostNotConnected": true, "HostNotReachable": true, "InvalidArgument": true,
	"InvalidRequest": true, "InvalidType": true, "ManagedObjectNotFound": true, "MethodNotFound": true,
	"NotEnoughLicenses": true, "NotImplemented": true, "NotSupported": true, "RequestCanceled": true,
	"SecurityError": true, "SystemError": true, "UnexpectedFault": true,
}

func vmodlName(t reflect.Type) string {
	for t.Kind() == reflect.Ptr {
		t = t.Elem()
	}
	n := t.Name()
	if strings.HasPrefix(n, "Base") && t.Kind() == reflect.Interface {
		n = strings.TrimPrefix(n, "Base")
	}
	if v, ok := vmodlNames[n]; ok {
		return v
	}
	if _, ok := reflect.New(t).Interface().(types.BaseMethodFault); ok {
		if vmodlFaults[n] {
			return "vmodl.fault." + n
		}
		return "vim.fault." + n
	}
	switch {
	case n == "VirtualDevice" || (strings.HasPrefix(n, "Virtual") && !strings.HasPrefix(n, "VirtualMachine") && !strings.HasPrefix(n, "VirtualApp")):
		return "vim.vm.device." + n
	case strings.HasPrefix(n, "VirtualMachine"):
		return "vim.vm." + strings.TrimPrefix(n, "VirtualMachine")
	case strings.HasPrefix(n, "Host"):
		return "vim.host." + strings.TrimPrefix(n, "Host")
	}
	switch t.Kind() {
	case reflect.String:
		return "string"
	case reflect.Int32, reflect.Int:
		return "int"
	case reflect.Int64:
		return "long"
	case reflect.Bool:
		return "boolean"
	}
	return "vim." + n
}

func morefString(r types.ManagedObjectReference) string {
	return fmt.Sprintf("'vim.%s:%s'", r.Type, r.Value)
}

var (
	timeType      = reflect.TypeOf(time.Time{})
	dynDataType   = reflect.TypeOf(types.DynamicData{})
	methodFaultTy = reflect.TypeOf(types.MethodFault{})
)

// dumpObject renders v (a struct or pointer to struct) in hostd style.
func dumpObject(v interface{}) string {
	var b strings.Builder
	dumpValue(&b, reflect.ValueOf(v), 0, nil)
	return b.String()
}

type field struct {
	name string
	val  reflect.Value
	omit bool
}

func structFields(v reflect.Value) []field {
	var out []field
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if f.PkgPath != "" {
			continue
		}
		if f.Anonymous {
			if f.Type == dynDataType {
				continue
			}
			fv := v.Field(i)
			if fv.Kind() == reflect.Struct {
				out = append(out, structFields(fv)...)
			}
			continue
		}
		tag := f.Tag.Get("xml")
		name := strings.Split(tag, ",")[0]
		if name == "" || name == "-" {
			continue
		}
		out = append(out, field{name: name, val: v.Field(i), omit: strings.Contains(tag, "omitempty")})
	}
	return out
}

func pad(n int) string { return strings.Repeat("   ", n) }

func dumpValue(b *strings.Builder, v reflect.Value, ind int, declared reflect.Type) {
	if !v.IsValid() {
		b.WriteString("<unset>")
		return
	}
	switch v.Kind() {
	case reflect.Interface:
		if v.IsNil() {
			b.WriteString("<unset>")
			return
		}
		dumpValue(b, v.Elem(), ind, v.Type())
		return
	case reflect.Ptr:
		if v.IsNil() {
			if v.Type().Elem().Kind() == reflect.Struct && v.Type().Elem() != timeType {
				fmt.Fprintf(b, "(%s) null", vmodlName(v.Type()))
				return
			}
			b.WriteString("<unset>")
			return
		}
		dumpValue(b, v.Elem(), ind, declared)
		return
	}
	if v.Type() == timeType {
		t := v.Interface().(time.Time)
		if t.IsZero() {
			b.WriteString("<unset>")
			return
		}
		fmt.Fprintf(b, "\"%s\"", t.UTC().Format("2006-01-02T15:04:05.999999Z"))
		return
	}
	switch v.Kind() {
	case reflect.String:
		fmt.Fprintf(b, "\"%s\"", v.String())
	case reflect.Bool:
		fmt.Fprintf(b, "%v", v.Bool())
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		fmt.Fprintf(b, "%d", v.Int())
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		fmt.Fprintf(b, "%d", v.Uint())
	case reflect.Float32, reflect.Float64:
		fmt.Fprintf(b, "%g", v.Float())
	case reflect.Slice:
		et := v.Type().Elem()
		name := vmodlName(et)
		if et == reflect.TypeOf(types.ManagedObjectReference{}) {
			name = "vmodl.ManagedObject"
			if v.Len() > 0 {
				name = "vim." + v.Index(0).Interface().(types.ManagedObjectReference).Type
			}
		}
		if v.Len() == 0 {
			fmt.Fprintf(b, "(%s) []", name)
			return
		}
		fmt.Fprintf(b, "(%s) [\n", name)
		for i := 0; i < v.Len(); i++ {
			b.WriteString(pad(ind + 1))
			dumpValue(b, v.Index(i), ind+1, et)
			if i < v.Len()-1 {
				b.WriteString(", ")
			}
			b.WriteString("\n")
		}
		b.WriteString(pad(ind) + "]")
	case reflect.Struct:
		if r, ok := v.Interface().(types.ManagedObjectReference); ok {
			b.WriteString(morefString(r))
			return
		}
		fields := structFields(v)
		fmt.Fprintf(b, "(%s) {\n", vmodlName(v.Type()))
		for i, f := range fields {
			b.WriteString(pad(ind+1) + f.name + " = ")
			if f.omit && f.val.Kind() == reflect.String && f.val.String() == "" {
				b.WriteString("<unset>")
			} else {
				dumpValue(b, f.val, ind+1, f.val.Type())
			}
			if i < len(fields)-1 {
				b.WriteString(", ")
			}
			b.WriteString("\n")
		}
		b.WriteString(pad(ind) + "}")
	default:
		fmt.Fprintf(b, "%v", v.Interface())
	}
}

// dumpFault renders a fault the way vim-cmd prints it:
//
//	(vim.fault.NotFound) {
//	   faultCause = (vmodl.MethodFault) null,
//	   faultMessage = <unset>
//	   msg = "..."
//	}
func dumpFault(f *OpFault) string {
	v := reflect.ValueOf(f.Fault)
	for v.Kind() == reflect.Ptr {
		v = v.Elem()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "(%s) {\n", vmodlName(v.Type()))
	lines := []string{"faultCause = (vmodl.MethodFault) null", "faultMessage = <unset>"}
	if esxiVer.OldFaultLayout {
		lines = []string{"dynamicType = <unset>", "faultCause = (vmodl.MethodFault) null"}
	}
	for _, fl := range structFields(v) {
		if fl.name == "faultCause" || fl.name == "faultMessage" {
			continue
		}
		var sb strings.Builder
		if fl.omit && fl.val.Kind() == reflect.String && fl.val.String() == "" {
			sb.WriteString("<unset>")
		} else {
			dumpValue(&sb, fl.val, 1, fl.val.Type())
		}
		lines = append(lines, fl.name+" = "+sb.String())
	}
	if esxiVer.OldFaultLayout {
		// 6.x: every line, msg included, ends with "," (apache/vcl's samples)
		for _, l := range lines {
			b.WriteString("   " + l + ",\n")
		}
		fmt.Fprintf(&b, "   msg = \"%s\",\n}\n", f.Msg)
		return b.String()
	}
	for i, l := range lines {
		b.WriteString("   " + l)
		if i < len(lines)-1 {
			b.WriteString(", ")
		}
		b.WriteString("\n")
	}
	fmt.Fprintf(&b, "   msg = \"%s\"\n}\n", f.Msg)
	return b.String()
}

var _ = methodFaultTy
